"""``python -m prefect_modal.per_step``: the flow run's command in the worker's per_step mode.

The command is stored in work pools' job templates (`worker.job_configuration`),
so its path stays put while the code lives in `prefect_modal.worker.per_step`.
"""

from prefect_modal.worker.per_step import main

if __name__ == "__main__":
    main()
