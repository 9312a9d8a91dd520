"""A tiny training run with the viewer data, for the viewer tests."""

from __future__ import annotations

from pathlib import Path

import torch

PROBES = ("cat", "dog")


def tiny_run(root: Path, epochs: int = 2) -> tuple[Path, object]:
    """Train ``epochs`` epochs of `TinyLitNet` with the callback writing to
    ``root/run-a`` (maps saved, no videos); returns (run folder, probes)."""
    import lightning as L

    import camanim
    from lit_models import TinyLitNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 3, 16, 16, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        probes = x[:len(PROBES)]
        out = root / "run-a"
        cb = camanim.CAManimCallback(probes, probe_names=list(PROBES), layers="conv",
                                     save_videos=False, log_videos=False, save_maps=True,
                                     save_dir=out, media_queue=0)
        torch.manual_seed(0)
        trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, accelerator="cpu",
                            devices=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=str(root))
        trainer.fit(TinyLitNet(n_conv=3, lr=0.1), dl)
    finally:
        torch.set_num_threads(threads)
    return out, probes
