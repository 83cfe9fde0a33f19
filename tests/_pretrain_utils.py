"""Helpers of the stage-1 tests: 2-process gloo workers and a tiny in-memory stage-1 data set."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

WORLD = 2


def _init(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def pure_loss_worker(rank: int, init_file: str, data: dict, out_dir: str) -> None:
    """Per-rank InfoNCE of a DDP-wrapped linear query map with keys gathered local-first; saves loss and grads."""
    from epg.method.losses import gather_local_first, info_nce

    _init(rank, init_file)
    try:
        layer = torch.nn.Linear(data["x"].shape[1], data["keys"].shape[1])
        layer.load_state_dict(data["layer"])
        model = torch.nn.parallel.DistributedDataParallel(layer)
        b = data["x"].shape[0] // WORLD
        local = slice(rank * b, (rank + 1) * b)
        keys = gather_local_first(data["keys"][local])
        loss = info_nce(model(data["x"][local]), keys, data["tau"]).mean()
        loss.backward()
        result = {"loss": loss.detach(), "keys": keys, "grads": {n: p.grad for n, p in layer.named_parameters()}}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def module_loss_worker(rank: int, init_file: str, data: dict, out_dir: str) -> None:
    """RCMLoss.terms of a PretrainModule on this rank's half of the batch; grads averaged over ranks as DDP does."""
    _init(rank, init_file)
    try:
        module = make_module(data["state"])
        module.hparams.seed = 1234 + 1000 * rank  # a different seed: the index must still come from rank 0
        index = module.loss.draw_pair_index(41, module.hparams.seed, 7)
        b = data["x0"].shape[0] // WORLD
        local = slice(rank * b, (rank + 1) * b)
        x0, v1, v2, eps = (data[k][local] for k in ("x0", "v1", "v2", "eps"))
        out = module.loss.terms(module.online, module.target, x0, v1, v2, eps, *data["sigmas"], data["tau_r"])
        out.loss.backward()
        grads = {}
        for name, p in module.online.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad / WORLD
        result = {"loss": out.loss.detach(), **out.logs} | {"grads": grads, "index": index}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def make_module(state: dict | None = None, **kwargs):
    """A Nano PretrainModule with eval-mode projector BN (per-sample maps: CPU has no SyncBatchNorm)."""
    from epg.lightning.pretrain import PretrainModule

    module = PretrainModule(preset="EPG-Nano/4", **kwargs)
    if state is not None:
        module.load_state_dict(state)
    module.train()
    module.online.projection_head.eval()
    return module


class TinyStage1Data(torch.utils.data.Dataset):
    """Deterministic stage-1 samples (x0, v1, v2, y) of size 16: the views are fixed perturbations of x0."""

    def __init__(self, n: int = 16, image_size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(n, 3, image_size, image_size, generator=g) * 0.5
        self.v1 = self.x0.flip(-1) + 0.1 * torch.randn(self.x0.shape, generator=g)
        self.v2 = self.x0 + 0.1 * torch.randn(self.x0.shape, generator=g)
        self.y = torch.arange(n) % 10

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, i: int) -> tuple:
        return self.x0[i], self.v1[i], self.v2[i], self.y[i]


def mnist_tensors(image_size: int) -> tuple[torch.Tensor, ...]:
    """The demo digits (4,500 train / 500 val) as normalized (N, 3, S, S) tensors and int64 labels."""
    import torch.nn.functional as F

    from epg.data.demo import load_digits, stratified_split
    from epg.method.normalization import normalize

    images, labels = load_digits()
    out = []
    for idx in stratified_split(labels):
        u = torch.from_numpy(images[idx]).float().div(255)[:, None]
        u = F.interpolate(u, size=image_size, mode="bilinear", antialias=True, align_corners=False)
        out += [normalize(u.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), "imagenet"), torch.from_numpy(labels[idx])]
    return tuple(out)


class AugmentedDigits(torch.utils.data.Dataset):
    """(x0, v1, v2, y) from in-memory images: two random resized crops with brightness jitter (a light §7)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, min_scale: float = 0.5) -> None:
        self.images, self.labels, self.min_scale = images, labels, min_scale

    def __len__(self) -> int:
        return self.images.shape[0]

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        size = x.shape[-1]
        area = float(torch.empty(()).uniform_(self.min_scale, 1.0))
        ratio = float(torch.empty(()).uniform_(-0.29, 0.29).exp())
        h = max(2, min(size, round(size * (area / ratio) ** 0.5)))
        w = max(2, min(size, round(size * (area * ratio) ** 0.5)))
        top, left = int(torch.randint(size - h + 1, ())), int(torch.randint(size - w + 1, ()))
        crop = x[None, :, top : top + h, left : left + w]
        view = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0]
        return view * float(torch.empty(()).uniform_(0.6, 1.4)) + float(torch.empty(()).uniform_(-0.2, 0.2))

    def __getitem__(self, i: int) -> tuple:
        x = self.images[i]
        return x, self._view(x), self._view(x), self.labels[i]
