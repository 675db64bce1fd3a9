"""Greedy decoding speed: growfam vs transformers on the same pair, prompts and device, one run.

Both libraries load the same two member directories (safetensors) and decode the same prompts:

- target alone: growfam `generate` vs transformers `AutoModelForCausalLM.generate`
  (do_sample=False, use_cache=True);
- speculative: growfam `speculative_generate` vs transformers' assisted generation
  (`generate(..., assistant_model=draft)`, the assistant's generation_config set to
  num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
  assistant_confidence_threshold=0, so every round drafts k tokens, as growfam's does).

Every system decodes exactly --max-new-tokens tokens a prompt: growfam without an eos,
transformers with eos_token_id None (no early stop; min_new_tokens would instead forbid the eos
token, which changes the greedy output), so the outputs compare token for token: each system's
are checked against growfam's target-only output. Acceptance is accepted / drafted; transformers
does not report it, so it is derived from forward passes counted by hooks (each target pass
emits the drafts it accepted + 1; each assistant pass proposes one token). Rounds alternate the
systems' order (a busy machine's slow spells hit all of them); the time of each is the median
of --repeats rounds after a warm-up, synchronised on CUDA.

    python bench/speculative.py --family growfam-demo --threads 1
    python bench/speculative.py --target DIR --draft DIR --prompts prompts.txt
    # GPU: random weights, the target a lossless expansion of the draft (acceptance near 1)
    python bench/speculative.py --device cuda --grow --max-new-tokens 128 \\
        --draft-preset paper-1b,n_layers=4,d_model=1024,n_heads=8,ffn_dim=3584 \\
        --target-preset paper-1b,n_layers=8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from growfam.checks import check_keys
from growfam.errors import ConfigError, GrowfamError
from growfam.infer import generate, read_prompts, speculative_generate
from growfam.model import Llama, ModelConfig, load_pretrained, num_params, resolve_config, save_pretrained


def preset_shape(spec: str) -> ModelConfig:
    """'NAME[,key=value...]': a preset (or config file) with some fields changed; a multi-head
    preset stays multi-head when n_heads changes."""
    name, *changes = spec.split(",")
    given = dict(change.split("=", 1) for change in changes if "=" in change)
    if len(given) != len(changes):
        raise ConfigError(f"preset {spec!r}: write each change as key=value")
    check_keys(given, list(ModelConfig.__dataclass_fields__), f"preset {spec!r}")
    cfg = resolve_config(name)
    if "n_heads" in given and cfg.n_kv_heads == cfg.n_heads:
        given.setdefault("n_kv_heads", given["n_heads"])
    return cfg.replace(**given)  # ModelConfig converts numeric text


def build_pair(target_spec: str, draft_spec: str, grow: bool, out: Path) -> tuple[Path, Path]:
    """Random-weight draft and target saved as member directories under `out`; with grow, the
    target is the draft expanded losslessly (same function, so greedy drafts are all accepted)."""
    from growfam.grow import expand

    torch.manual_seed(0)
    draft = Llama(preset_shape(draft_spec))
    if grow:
        target = expand(draft, preset_shape(target_spec), width="lossless", depth="identity")[0]
    else:
        target = Llama(preset_shape(target_spec))
    return save_pretrained(target, out / "target"), save_pretrained(draft, out / "draft")


def family_pair(family: str, target: str | None, draft: str | None) -> tuple[Path, Path, np.ndarray]:
    """The two largest progressive members (or those named, as MODE/NAME) and the val split."""
    from growfam.family.members import resolve_target

    found = resolve_target(family)
    progressive = sorted((m for m in found.members if m.mode == "progressive"), key=lambda m: num_params(m.config))
    paths = [Path(family) / name if name else member.path
             for name, member in ((target, progressive[-1]), (draft, progressive[-2]))]
    return paths[0], paths[1], found.dataset().tokens("val")


def cut_prompts(tokens, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens, starting at evenly spaced offsets of a token stream."""
    if len(tokens) < length + n:
        raise SystemExit(f"the validation split has {len(tokens)} tokens: too few for {n} prompts of {length}")
    return [np.asarray(tokens[s:s + length]).astype(int).tolist()
            for s in np.linspace(0, len(tokens) - length, n).astype(int)]


class Calls:
    """Forward passes of a module, counted by a pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else 'CPU'} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", help="a family directory: its progressive members and validation split")
    parser.add_argument("--target", help="target member directory (with --family: MODE/NAME in it)")
    parser.add_argument("--draft", help="draft member directory (with --family: MODE/NAME in it)")
    parser.add_argument("--target-preset", help="random target: a preset, with changes as ,key=value")
    parser.add_argument("--draft-preset", help="random draft: a preset, with changes as ,key=value")
    parser.add_argument("--grow", action="store_true", help="target = lossless expansion of the random draft")
    parser.add_argument("--prompts", help="a text file, one prompt a line (tokenized by the target's tokenizer)")
    parser.add_argument("--n", type=int, default=8, help="prompts (default: 8)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens cut for each prompt (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=8, help="draft tokens a round (default: 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tmp = tempfile.TemporaryDirectory(prefix="growfam-bench-")
    tokens = None
    if args.target_preset or args.draft_preset:
        if not (args.target_preset and args.draft_preset):
            parser.error("give both --target-preset and --draft-preset")
        target_dir, draft_dir = build_pair(args.target_preset, args.draft_preset, args.grow, Path(tmp.name))
        source = "random token ids (random-weight models)"
    elif args.family:
        target_dir, draft_dir, tokens = family_pair(args.family, args.target, args.draft)
        source = f"{args.family}'s validation split"
    elif args.target and args.draft and args.prompts:
        target_dir, draft_dir = Path(args.target), Path(args.draft)
        source = args.prompts
    else:
        parser.error("give --family DIR, or --target DIR --draft DIR --prompts FILE, or the two presets")
    if args.prompts:
        from growfam.data import load_tokenizer

        encode = load_tokenizer(target_dir).encode
        prompts = [encode(text) for text in read_prompts(args.prompts)[:args.n]]
    elif tokens is not None:
        prompts = cut_prompts(tokens, args.n, args.prompt_tokens)
    else:
        vocab = min(preset_shape(s).vocab_size for s in (args.target_preset, args.draft_preset))
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (args.n, args.prompt_tokens), generator=gen).tolist()

    ours = {name: load_pretrained(path, dtype=dtype, device=device).eval()
            for name, path in (("target", target_dir), ("draft", draft_dir))}
    theirs = {name: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
              for name, path in (("target", target_dir), ("draft", draft_dir))}
    context = min(m.cfg.max_seq_len for m in ours.values())
    if max(map(len, prompts)) + args.max_new_tokens > context:
        parser.error(f"prompts + --max-new-tokens exceed the context of {context} tokens")
    assistant = theirs["draft"].generation_config
    assistant.num_assistant_tokens, assistant.num_assistant_tokens_schedule = args.k, "constant"
    assistant.assistant_confidence_threshold = 0
    greedy = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=None,
                              pad_token_id=0, use_cache=True)
    calls = {name: Calls(model) for name, model in theirs.items()}
    M = args.max_new_tokens

    def hf(ids: list[int], draft=None) -> tuple[list[int], int, int]:
        before = calls["target"].n, calls["draft"].n
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = theirs["target"].generate(x, attention_mask=torch.ones_like(x), generation_config=greedy,
                                            assistant_model=draft)[0, len(ids):].tolist()
        target_calls, drafted = calls["target"].n - before[0], calls["draft"].n - before[1]
        return out, drafted, (len(out) - target_calls) if draft is not None else 0

    def spec(ids: list[int]) -> tuple[list[int], int, int]:
        out = speculative_generate(ours["target"], ours["draft"], ids, args.k, M)
        return out.tokens, out.drafted, out.accepted

    systems = {
        "growfam generate": lambda ids: (generate(ours["target"], ids, M).tokens, 0, 0),
        "transformers generate": hf,
        "growfam speculative": spec,
        "transformers assisted": lambda ids: hf(ids, theirs["draft"]),
    }
    sizes = {name: f"{num_params(m.cfg) / 1e6:.1f}M" for name, m in ours.items()}
    print(f"target {target_dir} ({sizes['target']}), draft {draft_dir} ({sizes['draft']}); {len(prompts)} prompts "
          f"from {source}, {M} new tokens each, k={args.k}, greedy, {args.dtype} on {machine(device)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attention {theirs['target'].config._attn_implementation}); load average before: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for run in systems.values():  # warm-up: first calls allocate and pick kernels
        run(prompts[0])
    seconds = {name: [] for name in systems}
    outputs = {}
    for round_ in range(args.repeats):
        for name in list(systems)[::1 if round_ % 2 == 0 else -1]:
            sync()
            start = time.perf_counter()
            outputs[name] = [systems[name](ids) for ids in prompts]
            sync()
            seconds[name].append(time.perf_counter() - start)

    reference = [tokens for tokens, _, _ in outputs["growfam generate"]]
    print(f"{'system':24} {'tokens/s':>9} {'median s':>9} {'acceptance':>11} {'same as growfam generate':>25}")
    rate = {}
    for name, outs in outputs.items():
        new = sum(len(tokens) for tokens, _, _ in outs)
        rate[name] = new / statistics.median(seconds[name])
        drafted, accepted = sum(o[1] for o in outs), sum(o[2] for o in outs)
        same = sum(tokens == want for (tokens, _, _), want in zip(outs, reference))
        acceptance = f"{accepted / drafted:.3f}" if drafted else "-"
        print(f"{name:24} {rate[name]:9.1f} {statistics.median(seconds[name]):9.2f} {acceptance:>11} "
              f"{same:>18}/{len(outs)} prompts" + (f" ({new} tokens)" if new != M * len(outs) else ""))
    print(f"growfam / transformers, target alone:  {rate['growfam generate'] / rate['transformers generate']:.2f}x")
    print(f"growfam / transformers, speculative:   {rate['growfam speculative'] / rate['transformers assisted']:.2f}x")
    print(f"speculative / target alone: growfam {rate['growfam speculative'] / rate['growfam generate']:.2f}x, "
          f"transformers {rate['transformers assisted'] / rate['transformers generate']:.2f}x")
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    tmp.cleanup()


if __name__ == "__main__":
    try:
        main()
    except GrowfamError as err:
        raise SystemExit(f"bench/speculative.py: {err}") from None
