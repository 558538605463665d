"""The LeRobot side of ``dp-ros bench policy --compare lerobot``.

Runs under LeRobot's own virtual environment (lerobot 0.4.4, torch 2.9.1), as a
subprocess: it imports neither dp_ros nor anything outside that environment.

    python lerobot_side.py make DIR --seed S --threads N
        build LeRobot's DiffusionPolicy in the paper's real-world CNN configuration
        (1 camera 96x96 cropped to 84, ResNet-18 with GroupNorm, U-Net [256, 512, 1024],
        T_o 2, T_p 16, DDIM 10) with LeRobot's own random initialisation, and save it with
        its processors (normalisation statistics) to DIR, the format dp-ros import reads.
    python lerobot_side.py serve DIR --threads N
        load DIR as a LeRobot user would and answer one JSON request per stdin line:
        {"npz": PATH} (state (T_o, D) float32, image (T_o, H, W, 3) uint8, noise (T_p, A))
        -> {"ms": plan time, "out": PATH of the (T_p, A) actions}. A plan is LeRobot's
        work for one chunk: normalise the window, encode every frame, denoise, unnormalise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

STATE_DIM = ACTION_DIM = 2


def _config():
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    return DiffusionConfig(
        input_features={"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 96, 96)),
                        "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        n_obs_steps=2, horizon=16, n_action_steps=8, crop_shape=(84, 84),
        use_group_norm=True, pretrained_backbone_weights=None, down_dims=(256, 512, 1024),
        noise_scheduler_type="DDIM", num_inference_steps=10, device="cpu")


def make(out: Path, seed: int) -> None:
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors
    torch.manual_seed(seed)
    cfg = _config()
    rng = np.random.default_rng(seed)
    stats = {"observation.image": {"mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
                                   "std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1),
                                   "min": torch.zeros(3, 1, 1), "max": torch.ones(3, 1, 1)}}
    for key, d in (("observation.state", STATE_DIM), ("action", ACTION_DIM)):
        lo = torch.tensor(rng.uniform(-1.5, -0.5, d), dtype=torch.float32)
        hi = lo + torch.tensor(rng.uniform(1.0, 2.0, d), dtype=torch.float32)
        stats[key] = {"min": lo, "max": hi, "mean": (lo + hi) / 2, "std": (hi - lo) / 4}
    policy = DiffusionPolicy(cfg)
    pre, post = make_diffusion_pre_post_processors(cfg, dataset_stats=stats)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    print(json.dumps({"params": sum(p.numel() for p in policy.parameters())}), flush=True)


def serve(src: Path) -> None:
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors
    policy = DiffusionPolicy.from_pretrained(src).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(src))
    cams = list(policy.config.image_features)
    import lerobot
    print(json.dumps({"ready": True, "lerobot": lerobot.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        data = np.load(req["npz"])
        state, image, noise = data["state"], data["image"], data["noise"]
        with torch.inference_mode():
            t0 = time.perf_counter()
            steps = []
            for t in range(state.shape[0]):  # each observation normalised as select_action does
                raw = {"observation.state": torch.from_numpy(state[t:t + 1]),
                       cams[0]: torch.from_numpy(image[t:t + 1]).permute(0, 3, 1, 2).float() / 255.0}
                steps.append(dict(pre(raw)))
            batch = {"observation.state": torch.stack([s["observation.state"] for s in steps], dim=1),
                     "observation.images": torch.stack(
                         [torch.stack([s[k] for k in cams], dim=-4) for s in steps], dim=1)}
            gc = policy.diffusion._prepare_global_conditioning(batch)
            actions = policy.diffusion.conditional_sample(1, global_cond=gc,
                                                          noise=torch.from_numpy(noise)[None])
            actions = post(actions)
            ms = (time.perf_counter() - t0) * 1e3
        out = req["npz"][:-4] + ".out.npy"
        np.save(out, actions[0].float().numpy())
        print(json.dumps({"ms": ms, "out": out}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make", "serve"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "make":
        make(a.dir, a.seed)
    else:
        serve(a.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
