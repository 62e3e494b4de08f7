"""The CPU example: scikit-learn's handwritten digits, no download needed.

A fixed split puts 1000 images in the training set and 797 in the test set. Model ``index`` draws a
mask over the training set with alpha = 0.5 (seeded by the index), trains a small MLP on the masked
examples, and returns ``masks`` (bool, [1000]) and ``margins`` (float32, [797]): for each test
image, the correct-class logit minus the log-sum-exp of the other logits. About 0.1 s per model on
one CPU core (or on the GPU the slot sees). Spec: ``configs/digits_spec.json``.
"""

from __future__ import annotations

import numpy as np

from datamodels_ml.digits import N_TRAIN, load_split

def margins_of(logits, labels):
    """Correct-class logit minus log-sum-exp of the other logits (the datamodels paper's margin)."""
    import torch

    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def main(*, index: int, logdir: str, alpha: float = 0.5, epochs: int = 60, hidden: int = 64,
         lr: float = 0.01) -> dict[str, np.ndarray]:
    import torch

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x_train, y_train, x_test, y_test = load_split()
    mask = np.random.default_rng(index).random(N_TRAIN) < alpha
    torch.manual_seed(index)
    xs = torch.from_numpy(x_train[mask]).to(device)
    ys = torch.from_numpy(y_train[mask]).to(device)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):  # full batch: a few hundred images
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test).to(device))
        margins = margins_of(logits, torch.from_numpy(y_test).to(device))
        accuracy = (logits.argmax(1).cpu().numpy() == y_test).mean()
    return {"masks": mask, "margins": margins.float().cpu().numpy(), "accuracy": np.float32(accuracy)}
