"""A tiny Lightning fit with CAManimCallback, run as a subprocess by
test_faults.py (killed with SIGKILL mid-epoch, then resumed).

    python fault_child.py ROOT EPOCHS [--resume] [--slow video|media]

``--slow video`` makes each MP4 frame take a moment (so the parent can see
the temporary file and kill us while ffmpeg writes it); ``--slow media``
pauses once an epoch's pictures and TensorBoard images are written (killed
before that epoch's checkpoint).
"""

import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402 - after the sys.path set-up above
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402 - after the sys.path set-up above
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402 - after the sys.path set-up above

from camanim.lightning.callback import CAManimCallback  # noqa: E402 - after the sys.path set-up above
from lit_models import TinyLitNet  # noqa: E402 - after the sys.path set-up above


def Net() -> TinyLitNet:  # noqa: N802 - the name the script always used
    return TinyLitNet(n_conv=3, lr=0.05)


def main() -> None:
    root, epochs = Path(sys.argv[1]), int(sys.argv[2])
    resume = "--resume" in sys.argv
    slow = sys.argv[sys.argv.index("--slow") + 1] if "--slow" in sys.argv else None
    if slow == "video":
        from camanim.viz import video

        write = video._FFmpegSink.write

        def slow_write(self, frame):
            write(self, frame)
            time.sleep(0.4)

        video._FFmpegSink.write = slow_write
    elif slow == "media":
        from camanim.lightning import callback

        media = callback.write_epoch_media

        def slow_media(m, *a, **k):
            media(m, *a, **k)
            (root / f"media_done_{m.epoch}").touch()  # the parent's kill signal
            time.sleep(3)

        callback.write_epoch_media = slow_media
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cb = CAManimCallback(x[:2], save_dir=root / "cam", normalization="local", log_videos=True,
                         tb_video_size=32, media_queue=0, media_workers=1, on_error="raise")
    ck = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_last=True, save_top_k=-1,
                         every_n_epochs=1)
    tr = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True,
                   logger=TensorBoardLogger(str(root), name="tb", version=0),
                   enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(root), callbacks=[cb, ck], num_sanity_val_steps=0)
    last = root / "ckpt" / "last.ckpt"
    tr.fit(Net(), data, ckpt_path=str(last) if resume and last.exists() else None)
    print("DONE", os.getpid(), flush=True)


if __name__ == "__main__":
    main()
