"""How a local sandbox runs on this machine: isolation, processes, output streams.

* `sandbox` - one sandbox: its processes, lifetime, stdin/stdout and ``exec``;
* `isolation` - what its container is made of, and how the server reaches in;
* `container` - the namespace calls, run in the fork server's child;
* `network` / `netns_pool` - a sandbox's network of its own: the host ports
  forwarded into it on purpose, namespaces made ahead with pasta attached;
* `processes` - starting, watching and killing process trees;
* `forkserver` / `zygote` - warm interpreters that fork sandbox processes;
* `streams` - replayable output buffers;
* `tunnels` / `relay` / `connect_proxy` / `tls` - ports reached from the host;
* `probes` - readiness probes.
"""
