"""Mixed resources, one flow: CPU preprocessing, GPU training, a smaller GPU to evaluate.

    python flows/ml_pipeline.py

The shape of ZenML's Modal example in Prefect terms.  Each step asks for what
it needs with `modal_options`; the runner's spec is the default for the rest.
On the local server a GPU request runs on CPU (its first log line says so); on
Modal, add credentials and the same steps get an A100 and an L4.  The "model"
is a least-squares line fitted in pure Python, so it runs in any image.
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "PREFECT_API_URL" not in os.environ:
    # Run as a script with no Prefect server: Prefect starts a temporary one, and
    # on a first run it creates and migrates a new database, which on a slow or
    # busy machine takes longer than Prefect's 20 s startup timeout. Only for
    # this script, and only unless you set it yourself.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import random

from prefect import flow, task

from prefect_modal import ModalTaskRunner, SandboxSpec, modal_options


@modal_options(cpu=2, memory="1GiB")
@task
def preprocess(n: int, seed: int = 7) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    data = [(x, 3.0 * x + 2.0 + rng.gauss(0, 0.5)) for x in (rng.uniform(0, 10) for _ in range(n))]
    print(f"preprocessed {len(data)} samples")
    return data


@modal_options(gpu="A100", memory="4GiB", timeout=1800)
@task(retries=1)
def train(data: list[tuple[float, float]], epochs: int = 200, lr: float = 0.01) -> dict[str, float]:
    slope, intercept = 0.0, 0.0
    for epoch in range(epochs):
        grad_s = sum((slope * x + intercept - y) * x for x, y in data) / len(data)
        grad_i = sum(slope * x + intercept - y for x, y in data) / len(data)
        slope, intercept = slope - lr * grad_s, intercept - lr * grad_i
        if epoch % 50 == 0:
            print(f"epoch {epoch}: slope={slope:.3f} intercept={intercept:.3f}")
    return {"slope": slope, "intercept": intercept}


@modal_options(gpu="L4")
@task
def evaluate(model: dict[str, float], data: list[tuple[float, float]]) -> float:
    mse = sum((model["slope"] * x + model["intercept"] - y) ** 2 for x, y in data) / len(data)
    print(f"mean squared error: {mse:.4f}")
    return mse


@flow(task_runner=ModalTaskRunner(spec=SandboxSpec(cpu=1, memory="512MiB")), log_prints=True)
def ml_pipeline(samples: int = 500) -> float:
    data = preprocess.submit(samples)
    model = train.submit(data)
    return evaluate.submit(model, data).result()


if __name__ == "__main__":
    print(f"mse = {ml_pipeline():.4f}")
