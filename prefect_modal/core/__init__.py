"""What every mode shares; it imports no mode (task_runner, worker, sessions, cli).

* `spec` - `SandboxSpec`, a sandbox's settings, validated once;
* `resources` - GPU, cpu and memory rules and their messages;
* `modal_api` - the ONLY module that calls the modal SDK;
* `credentials` - the `ModalCredentials` block; `targets` - which Modal a run
  reaches (credentials, ambient config, or the embedded local server);
* `tags` - the tag keys sandboxes carry; `packages` - what a call's code
  needs installed in its image;
* `artifacts` - sandbox records as Prefect artifacts; `pricing` - their cost;
* `cancellation` - the registry that ends a flow run's sandboxes and sessions;
* `errors` - `PrefectModalError`, the root of the adapter's errors.
"""
