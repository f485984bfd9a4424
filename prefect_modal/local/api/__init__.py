"""The RPC handlers, in rooms by Modal's own areas.

* `apps` - hello, auth token, apps (`modal app list|stop`, `modal run`), environments;
* `tasks` - containers as `modal container list|logs|stop` see them;
* `images` - image definitions and their build stream;
* `secrets`, `volumes` - named objects;
* `sandboxes` - create, wait, terminate, list, names, tags, V1 logs and stdin;
* `router` - the task command router: V2 stdio, readiness, ``exec``;
* `tunnels` - tunnels, connect tokens and the readiness wait;
* `filesystem` - ``sandbox.filesystem`` (the fs-tools commands);
* `context` - what they share (state, auth, sandbox creation); `base` - errors
  and the servicer assembly.
"""
