"""Grids every k steps, final images, and an mp4 of the optimization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from sdbridge.media import make_grid, save_png, to_uint8, write_video


class MediaCallback(L.Callback):
    """Writes ``images/step_XXXXXX.png`` grids every ``save_every`` steps, ``images/final/`` at the end and, with
    ``video_every > 0``, a frame every ``video_every`` steps assembled into ``video.mp4``.

    Frames are kept as PNG files (``images/frames/``) rather than in memory so a resumed run's video still shows
    the whole optimization.
    """

    def __init__(self, run_dir: Path, save_every: int = 100, video_every: int = 0, fps: int = 10):
        self.run_dir = Path(run_dir)
        self.save_every = save_every
        self.video_every = video_every
        self.fps = fps
        self.final_paths: list[Path] = []
        self.video_path: Path | None = None

    def _log_image(self, trainer: L.Trainer, key: str, grid: Any, step: int) -> None:
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[to_uint8(grid)], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        want_grid = self.save_every > 0 and step % self.save_every == 0
        want_frame = self.video_every > 0 and (step % self.video_every == 0 or step == 1)
        if not (want_grid or want_frame):
            return
        grid = make_grid(pl_module.target.preview())
        if want_grid:
            save_png(grid, self.run_dir / "images" / f"step_{step:06d}.png")
            self._log_image(trainer, "images/grid", grid, step)
        if want_frame:
            save_png(grid, self.run_dir / "images" / "frames" / f"{step:06d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        final = self.run_dir / "images" / "final"
        self.final_paths = pl_module.target.export(final, pl_module.prompts)
        grid_path = final / "grid.png"
        if self.video_every > 0:
            frames_dir = self.run_dir / "images" / "frames"
            frames = sorted(frames_dir.glob("*.png"))
            if grid_path.exists():
                frames.append(grid_path)
            if frames:
                self.video_path = write_video(frames, self.run_dir / "video.mp4", fps=self.fps)
        logger = trainer.logger
        if grid_path.exists() and logger is not None and hasattr(logger, "log_image"):
            import imageio.v3 as iio

            logger.log_image(key="images/final", images=[iio.imread(grid_path)], step=trainer.global_step)
        if logger is not None and hasattr(logger, "log_video"):  # W&B: the optimization video, NeRF turntables
            videos = [p for p in self.final_paths if Path(p).suffix == ".mp4"]
            for key, path in [("video/optimization", self.video_path)] + [(f"video/{Path(p).stem}", p) for p in videos]:
                if path is not None and Path(path).is_file():
                    logger.log_video(key=key, videos=[str(path)], step=trainer.global_step, format=["mp4"])
