"""diffusers' discrete-time schedules and sampling loops, recorded for the Flax bridge's parity
tests (ediffi_jax/diffusion/discrete.py, tests/test_discrete.py).

Run from the repo root with the tools venv (tools/requirements-torch.txt):

    .venv-tools/bin/python tools/scheduler_fixtures.py --out tests/fixtures/diffusers/schedulers.npz

For each published scheduler config (CONFIGS; the JSON is stored in the npz as "configs") it
records alphas_cumprod, EulerDiscreteScheduler's and DPMSolverMultistepScheduler's sigmas and
timesteps after set_timesteps(N) (with and without Karras sigmas), Euler's _sigma_to_t at probe
sigmas, and the final latents of full sampling loops (the loop as the pipelines write it) with
an analytic model `model(x, t)` that tests/test_discrete.py writes identically in jax.
Deterministic and offline.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED = os.path.join(HERE, "..", "configs", "pretrained")


def published(name):
    with open(os.path.join(PRETRAINED, name, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


CONFIGS = {
    "sd15": published("sd15"),  # PNDM: Euler/DPM from_config use their default linspace spacing
    "sd21": published("sd21"),  # DDIM, v_prediction
    "sdxl": published("sdxl_base"),  # Euler, leading, steps_offset 1
    # DeepFloyd IF-I's DDPMScheduler config (written from memory of the published file) with
    # thresholding off: the bridge rejects thresholding=True (tests check that error).
    "if_nothreshold": {
        "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
        "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.5, "steps_offset": 0,
        "thresholding": False, "timestep_spacing": "leading", "trained_betas": None,
        "variance_type": "learned_range",
    },
    # Zero terminal SNR (arXiv 2305.08891), trailing, v-prediction; linear betas.
    "zsnr": {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "linear", "prediction_type": "v_prediction",
        "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "steps_offset": 0,
    },
}
STEPS = (10, 25)
PROBE_SIGMAS = np.array([1e-4, 0.0135, 0.05, 0.3, 1.0, 2.7, 7.5, 14.0, 14.61, 200.0, 3000.0])
LATENT = (2, 4, 4, 3)  # NHWC; IF's model outputs 2 * 3 channels
# (name, config, solver, karras, N)
TRAJECTORIES = [
    ("euler_sd15", "sd15", "euler", False, 10),
    ("euler_sdxl", "sdxl", "euler", False, 10),
    ("euler_sdxl_karras", "sdxl", "euler", True, 10),
    ("euler_sd21_v", "sd21", "euler", False, 10),
    ("euler_zsnr_v", "zsnr", "euler", False, 10),
    ("dpm_sdxl", "sdxl", "dpmsolver", False, 10),
    ("dpm_sdxl_karras", "sdxl", "dpmsolver", True, 10),
    ("dpm_sd21_v", "sd21", "dpmsolver", False, 20),
    ("dpm_if", "if_nothreshold", "dpmsolver", False, 10),
]


def model(x, t, out_channels):
    """The analytic network, NCHW: f = tanh(0.3 x) cos(t / 500) + 0.1 t / 1000, and for a
    learned-variance model (2x channels) a second half 0.5 x."""
    t = torch.as_tensor(t, dtype=torch.float32)
    f = torch.tanh(0.3 * x) * torch.cos(t / 500.0) + 0.1 * t / 1000.0
    if out_channels == 2 * x.shape[1]:
        f = torch.cat([f, 0.5 * x], dim=1)
    return f


def scheduler(config, solver, karras):
    cls = EulerDiscreteScheduler if solver == "euler" else DPMSolverMultistepScheduler
    return cls.from_config(config, use_karras_sigmas=karras)


def sample(config, solver, karras, steps, noise_nhwc):
    s = scheduler(config, solver, karras)
    s.set_timesteps(steps)
    x = torch.from_numpy(noise_nhwc.transpose(0, 3, 1, 2).copy()) * s.init_noise_sigma
    out_channels = 2 * x.shape[1] if config.get("variance_type") in ("learned_range", "learned") \
        else x.shape[1]
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        x = s.step(model(inp, t, out_channels), t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rec = {"configs": np.array(json.dumps(CONFIGS)), "probe_sigmas": PROBE_SIGMAS,
           "trajectories": np.array(json.dumps(TRAJECTORIES))}
    for name, config in CONFIGS.items():
        euler = scheduler(config, "euler", False)
        rec[f"{name}/alphas_cumprod"] = euler.alphas_cumprod.numpy()
        log_sigmas = np.log(np.array(((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5))
        rec[f"{name}/sigma_to_t"] = euler._sigma_to_t(PROBE_SIGMAS, log_sigmas)
        for solver in ("euler", "dpmsolver"):
            for karras in (False, True):
                for n in STEPS:
                    s = scheduler(config, solver, karras)
                    s.set_timesteps(n)
                    key = f"{name}/{solver}{'_karras' if karras else ''}/{n}"
                    rec[key + "/sigmas"] = s.sigmas.numpy()
                    rec[key + "/timesteps"] = s.timesteps.numpy().astype(np.float64)
                    rec[key + "/init_noise_sigma"] = np.float64(s.init_noise_sigma)
    noise = np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)
    rec["noise"] = noise
    for name, cfg, solver, karras, n in TRAJECTORIES:
        rec[f"final/{name}"] = sample(CONFIGS[cfg], solver, karras, n, noise)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **rec)
    print(f"wrote {args.out}: {len(rec)} arrays, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
