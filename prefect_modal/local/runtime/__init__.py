"""How a local sandbox runs on this machine: isolation, processes, output streams.

* `sandbox` - one sandbox: its processes, lifetime, stdin/stdout and ``exec``;
* `isolation` - what its container is made of, and how the server reaches in;
* `etc_view` - the allow-listed part of this machine's /etc that sandboxes see;
* `container` - the namespace calls, run in the fork server's child;
* `seccomp_filter` - the sandboxes' seccomp filter (Docker's default profile, libseccomp);
* `network` / `netns_pool` - a sandbox's network of its own: the host ports
  forwarded into it on purpose, namespaces made ahead with pasta attached;
* `processes` - starting, watching and killing process trees;
* `cgroups` - memory, cpu and pids limits, where this machine allows;
* `forkserver` / `zygote` - warm interpreters that fork sandbox processes;
* `streams` - replayable output buffers;
* `safe_files` - files read and written inside a sandbox's tree or a volume: regular
  files only, by descriptor, in bounded pieces;
* `volume_views` - a v1 volume's private copy for one sandbox, merged back at its end;
* `tunnels` / `relay` / `connect_proxy` / `tls` - ports reached from the host;
* `probes` - readiness probes.
"""
