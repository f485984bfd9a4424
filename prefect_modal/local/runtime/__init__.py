"""How a local sandbox runs on this machine: isolation, processes, output streams.

* `sandbox` - one sandbox: its processes, lifetime, stdin/stdout and ``exec``;
* `isolation` - what its container is made of, and how the server reaches in;
* `container` - the namespace calls, run in the fork server's child;
* `processes` - starting, watching and killing process trees;
* `forkserver` / `zygote` - warm interpreters that fork sandbox processes;
* `streams` - replayable output buffers;
* `safe_files` - files read and written inside a sandbox's tree or a volume: regular
  files only, by descriptor, in bounded pieces;
* `volume_views` - a v1 volume's private copy for one sandbox, merged back at its end;
* `tunnels` / `relay` / `connect_proxy` / `tls` - ports reached from the host;
* `probes` - readiness probes.
"""
