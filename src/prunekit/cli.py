"""`prunekit <verb>`: the command line, a thin layer over `prunekit.api`.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 a fault of the machine (full disk, denied write) or an
internal error (one line), 130 Ctrl-C. Progress bars go to stderr; `--json` prints the result record on stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from prunekit import names
from prunekit.artifacts.files import Staging, check_distinct, check_output_dir, check_output_file, file_sha256
from prunekit.errors import PrunekitError

# prunekit's modules import torch and transformers (seconds); the parser does not, so that `--help` and argument
# errors answer at once. `prunekit.api` is imported when a verb runs.


class ArgumentParser(argparse.ArgumentParser):
    """argparse with prunekit's error style: one line naming the option and the value, exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"prunekit: error: {message} (see '{self.prog} --help')\n")


def count(minimum: int):
    """An argparse type for whole numbers of at least `minimum` (sizes, counts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def count_or_fraction(meaning: str):
    """An argparse type for a budget given either way: '2' is a count (int), '0.25' a fraction (float); anything
    else is refused as `{text} is <meaning>`."""

    def parse(text: str) -> int | float:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is {meaning}") from None

    parse.__name__ = "count or fraction"
    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="asset name (smollm2-135m) or a local Hugging Face directory")
    parser.add_argument("--device", default=None,
                        help="compute device, e.g. cpu or cuda (default: where the model is, the CPU)")
    parser.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the result record as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_options(parser: argparse.ArgumentParser, prefix: str, encoders: bool = False) -> None:
    also = "; encoders: tokens per text (default 256)" if encoders else ""
    parser.add_argument(f"--{prefix}seq-len", type=count(2), default=None,
                        help=f"tokens per evaluation window (default 512){also}")
    also = "; encoders: held-out texts embedded (default 200)" if encoders else ""
    parser.add_argument(f"--{prefix}windows", type=count(0), default=None,
                        help=f"number of non-overlapping windows evaluated (default 64, 0 = all){also}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="prunekit", description="Prune neural networks and measure the result.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("prune", help="prune a causal LM's weights, structures (heads, neurons) or blocks, saved as "
                         "a Hugging Face directory; or the channels of a prunekit network (mobilenet-v2, ...)")
    _common(p)
    p.add_argument("--method", default=None,
                   help=f"weights: {', '.join(names.ONESHOT_METHODS)} (default: wanda); structures: "
                        f"{', '.join(names.STRUCTURE_METHODS)}; blocks: {', '.join(names.DEPTH_METHODS)}; networks "
                        f"({', '.join(NETS_FOR_GRAPH)}): l1, l2, bn-scale, taylor, activation, random (default: "
                        f"taylor, on 32 inputs)")
    p.add_argument("--object", choices=OBJECTS, default=None,
                   help="what is pruned (default: told by the method and budget; needed for 'random' with --remove)")
    p.add_argument("--sparsity", type=float, default=None, help="weights: fraction removed, in [0, 1)")
    p.add_argument("--pattern", default=None, help="weights: 'unstructured' (default) or N:M, e.g. 2:4")
    p.add_argument("--remove", type=float, default=None,
                   help="structures or blocks: fraction of all the model's parameters removed, in (0, 1)")
    p.add_argument("--remove-macs", type=float, default=None,
                   help="structures and networks: fraction of the multiply-accumulates of one forward pass removed, "
                        "in (0, 1), instead of --remove")
    p.add_argument("--blocks", type=count(1), default=None,
                   help="blocks: number of transformer blocks (or sublayers, with --unit) removed")
    p.add_argument("--unit", choices=names.DEPTH_UNITS, default=None,
                   help="blocks: remove whole blocks (default), or only their attention or mlp sublayers")
    p.add_argument("--merge", action="store_true", default=None,
                   help="blocks: fold each run of chosen blocks into the block before it (LaCo) instead of deleting")
    p.add_argument("--units", default=None,
                   help="structures: heads, neurons, or heads,neurons (default); a KV head goes with its query heads")
    p.add_argument("--round-to", type=count(1), default=None, help="structures: kept neuron counts a multiple of it")
    p.add_argument("--mode", choices=("remove", "mask"), default=None,
                   help="structures: remove the units, shrinking the tensors (default), or zero them in the dense "
                        "shapes (with --save-masks, a structured mask for given+admm --masks or heal --masks)")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None,
                   help="structures: time a forward pass (batch 1 and 16 × 128 tokens) before and after (default on; "
                        "MACs are always counted)")
    p.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="networks with BatchNorm (mobilenet-v2, resnet-small, small-cnn): re-estimate its statistics "
                        "on the calibration inputs after pruning (default on; the agreement is reported both ways)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="structures: prune block after block and re-fit the output projections by least squares "
                        "(default: on for obs, off otherwise)")
    p.add_argument("--allocation", default="uniform",
                   help=f"per-block budget: weights {', '.join(names.ONESHOT_ALLOCATIONS)}; structures "
                        f"{', '.join(names.STRUCTURE_ALLOCATIONS)}")
    p.add_argument("--owl-threshold", type=float, default=5.0, help="OWL outlier multiple M (default 5)")
    p.add_argument("--owl-limit", type=float, default=0.08, help="OWL largest per-block deviation (default 0.08)")
    p.add_argument("--calib", default="wiki-summaries", help="calibration text: asset name or local file")
    p.add_argument("--calib-samples", type=count(1), default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=count(2), default=None,
                   help="tokens per calibration sequence (default 512; encoders 128)")
    p.add_argument("--seed", type=count(0), default=0, help="seed for calibration sampling and random scores")
    p.add_argument("--admm-rho", type=float, default=None, help="ADMM methods: penalty rho (default 1)")
    p.add_argument("--admm-iterations", type=count(0), default=None,
                   help="ADMM methods: iterations (default 20; 0 = no update)")
    p.add_argument("--admm-ramp-dtype", choices=names.ADMM_RAMP_DTYPES, default=None,
                   help="gradual ADMM (admm, admm+dsnot): precision of the iterations while the mask ramps up "
                        "(default auto: bfloat16 where the device multiplies it natively, else float32)")
    p.add_argument("--dsnot-cycles", type=count(0), default=None,
                   help="+dsnot methods: most prune-and-grow swaps per output row (default 50; 0 = none)")
    p.add_argument("--ecoflap-directions", type=count(1), default=None,
                   help="--allocation ecoflap: random directions per block (default 2; 2 forward passes each)")
    p.add_argument("--ecoflap-epsilon", type=float, default=None,
                   help="--allocation ecoflap: perturbation, relative to each weight (default 0.001)")
    p.add_argument("--true-sequential", action="store_true", default=None,
                   help="weights: calibrate each projection group of a block on the outputs of the groups pruned "
                        "before it (attention before MLP), for methods calibrated on activations")
    p.add_argument("--offload", action="store_true", default=None,
                   help="weights: keep the model's blocks in their files and load one at a time (models larger "
                        "than memory); the output is written shard by shard")
    p.add_argument("--masks", default=None, metavar="FILE",
                   help="given+admm: the keep-masks to apply, a safetensors file of bool tensors by parameter name "
                        "(as --save-masks writes)")
    p.add_argument("--save-masks", default=None, metavar="FILE",
                   help="weights, and structures with --mode mask: also write the keep-masks the method chose to "
                        "this safetensors file (for given+admm --masks, or prunekit heal --masks)")
    p.add_argument("--blocksize", type=count(1), default=128, help="SparseGPT lazy-update block (default 128)")
    p.add_argument("--damping", type=float, default=0.01, help="SparseGPT Hessian dampening (default 0.01)")
    p.add_argument("--batch-size", type=count(1), default=8, help="calibration sequences per forward (default 8)")
    p.add_argument("--eval-data", default=None,
                   help="perplexity text before and after pruning (default wiki-summaries); encoders: texts whose "
                        "embeddings are compared with the dense model's (default bbc-news, held-out split)")
    p.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    _eval_options(p, "eval-", encoders=True)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    e = verbs.add_parser("eval", help="perplexity of a causal LM with a stated protocol, or what token pruning "
                                      "costs in quality and gains in speed (--tokens)")
    _common(e)
    e.add_argument("--data", default=None, help="text asset name or local file (default wiki-summaries; --tokens on "
                                                "encoders: bbc-news)")
    _eval_options(e, "")
    e.add_argument("--batch-size", type=count(1), default=None, help="windows per forward (default 4)")
    e.add_argument("--tokens", default=None, metavar="SPEC",
                   help="measure token pruning: METHOD[:KEY=VALUE,...], e.g. tome:r=8, zero-tprune:keep=0.5, "
                        "cls-attention:r=8, random:r=8 on encoders; fastv:keep=0.5,layer=2[,feather=true] on decoders")
    e.add_argument("--continuation", type=count(1), default=None,
                   help="--tokens on decoders: tokens predicted after each pruned prompt (default 64)")

    g = verbs.add_parser("graph", help="the coupled groups that structured pruning removes together")
    g.add_argument("--model", required=True,
                   help="asset name (smollm2-135m, minilm-l6), a local Hugging Face directory, or mobilenet-v2 "
                        f"(ImageNet weights) or a prunekit network ({', '.join(NETS_FOR_GRAPH)}) traced with torch.fx")
    g.add_argument("--input-shape", default=None,
                   help="traced networks: the example input's shape, e.g. 1,3,224,224 (default: the network's own)")
    g.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--json", action="store_true", help="print the groups as JSON on stdout")
    g.set_defaults(run=_graph, summary=lambda record: "\n".join(record["groups"]))

    from prunekit.data import cli as data_cli  # inside `main`'s error handling, like every other import
    from prunekit.deltas import cli as deltas_cli
    from prunekit.experts import cli as experts_cli
    from prunekit.recovery import cli as recovery_cli
    from prunekit.training import cli as training_cli

    training_cli.add_parser(verbs)
    data_cli.add_parser(verbs)
    recovery_cli.add_parser(verbs)
    deltas_cli.add_parser(verbs)  # `delta` and `delta-merge`
    experts_cli.add_parser(verbs)
    return parser


# networks `prunekit graph` builds by name, with the input each is made for
NETS_FOR_GRAPH = {"mobilenet-v2": (1, 3, 224, 224), "resnet-small": (1, 1, 28, 28), "small-cnn": (1, 1, 28, 28),
                  "lenet-300-100": (1, 784)}


def _graph(args: argparse.Namespace) -> dict:
    """`prunekit graph`: one line per coupled group, from the adapter (Hugging Face models) or the traced graph."""
    import torch

    from prunekit.structure.api import describe_structure

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model in NETS_FOR_GRAPH:
        from prunekit import nets

        shape = NETS_FOR_GRAPH[args.model]
        if args.input_shape is not None:
            try:
                shape = tuple(int(part) for part in args.input_shape.split(","))
            except ValueError:
                raise PrunekitError(f"--input-shape {args.input_shape!r} must be integers separated by commas, "
                                    "e.g. 1,3,224,224") from None
            if not shape or min(shape) < 1:
                raise PrunekitError(f"--input-shape {args.input_shape!r} must hold positive sizes")
        model = nets.mobilenet_v2_imagenet() if args.model == "mobilenet-v2" else nets.build_net(args.model, seed=0)
        return {"model": args.model, "input_shape": list(shape),
                "groups": describe_structure(model.eval(), torch.zeros(shape))}
    if args.input_shape is not None:
        raise PrunekitError("--input-shape applies to traced networks; a Hugging Face model's groups come from its "
                            "adapter")
    from prunekit.assets import is_encoder, load_causal_lm
    from prunekit.data.embed import load_encoder

    loaded = load_encoder(args.model) if is_encoder(args.model) else load_causal_lm(args.model)
    return {"model": args.model, "groups": describe_structure(loaded.model)}


OBJECTS = ("weights", "structures", "blocks")
# Options of one method or allocation of weights, each refused where it would do nothing: (what they apply to, test).
_WEIGHT_OPTIONS = {"admm_rho": ("ADMM methods", lambda a: "admm" in a.method),
                   "admm_iterations": ("ADMM methods", lambda a: "admm" in a.method),
                   "admm_ramp_dtype": ("the gradual ADMM methods (admm, admm+dsnot)",
                                       lambda a: a.method.split("+")[0] == "admm"),
                   "dsnot_cycles": ("+dsnot methods", lambda a: a.method.endswith("+dsnot")),
                   "ecoflap_directions": ("--allocation ecoflap", lambda a: a.allocation == "ecoflap"),
                   "ecoflap_epsilon": ("--allocation ecoflap", lambda a: a.allocation == "ecoflap"),
                   # which methods it changes, check_prune_options says
                   "true_sequential": ("methods calibrated on activations", lambda a: True)}
# Options that apply to one object only; giving one for another object is refused, never silently ignored.
_OPTIONS_OF = {"weights": ("sparsity", "pattern", "offload", "masks", "save_masks", *_WEIGHT_OPTIONS),
               "structures": ("remove", "remove_macs", "units", "round_to", "reconstruct", "speed", "mode",
                              "save_masks"),
               "blocks": ("remove", "blocks", "unit", "merge")}


def _prune_object(args: argparse.Namespace) -> str:
    """What `prunekit prune` prunes, from --object or else from the method and the budget options."""
    families = {"weights": names.ONESHOT_METHODS, "structures": names.STRUCTURE_METHODS,
                "blocks": names.DEPTH_METHODS}
    if args.object is not None:
        kind = args.object
    else:
        candidates = [k for k, methods in families.items() if args.method in methods]
        if not candidates:
            raise PrunekitError(f"unknown method '{args.method}'; weights: {', '.join(names.ONESHOT_METHODS)}; "
                                f"structures: {', '.join(names.STRUCTURE_METHODS)}; blocks: "
                                f"{', '.join(names.DEPTH_METHODS)}")
        if len(candidates) > 1:  # 'random' is the baseline of every object
            given = [k for k in candidates if any(getattr(args, o) is not None for o in _OPTIONS_OF[k])]
            if args.blocks is not None:
                given = ["blocks"]
            if len(given) > 1:
                raise PrunekitError(f"method '{args.method}' exists for {' and '.join(given)}; say which with "
                                    f"--object {' or --object '.join(given)}")
            candidates = given or ["weights"]
        kind = candidates[0]
    if args.method not in families[kind]:
        raise PrunekitError(f"method '{args.method}' does not prune {kind}; {kind}: {', '.join(families[kind])}")
    for option in sorted({o for options in _OPTIONS_OF.values() for o in options} - set(_OPTIONS_OF[kind])):
        if getattr(args, option) is not None:
            owners = " and ".join(k for k in OBJECTS if option in _OPTIONS_OF[k])
            raise PrunekitError(f"--{option.replace('_', '-')} applies to {owners}, not to {kind} "
                                f"(method '{args.method}')")
    return kind


def _units(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


# the options `prunekit prune` takes for a traced network; any other given for one is refused, never ignored
_NET_OPTIONS = ("verb", "model", "method", "object", "remove", "remove_macs", "allocation", "round_to", "seed",
                "speed", "recalibrate_bn", "threads", "json", "quiet", "out", "overwrite")
AGREEMENT_IMAGES = 64


def _prune_net(args: argparse.Namespace, progress: bool) -> dict:
    """`prunekit prune` of a prunekit network: `prune_structure` through its traced graph on an example input of
    the network's shape, MACs (and latency) before and after, for mobilenet-v2 the top-1 agreement with the dense
    model on crops of natural photographs; saved with the geometry of its layers (`prunekit.load` rebuilds it)."""
    import copy

    import torch

    from prunekit import api, nets
    from prunekit.assets import sample_image_crops
    from prunekit.measure import latency, speed_record
    from prunekit.structure import recalibrate_batchnorm

    defaults = vars(build_parser().parse_args(["prune", "--model", args.model, "--out", args.out]))
    for option, value in vars(args).items():
        if option not in _NET_OPTIONS and value != defaults.get(option):
            raise PrunekitError(f"--{option.replace('_', '-')} applies to language models; {args.model} is pruned "
                                "through its traced graph with --method, --remove or --remove-macs, --allocation, "
                                "--round-to, --seed and --speed")
    if args.object not in (None, "structures"):
        raise PrunekitError(f"a network's channels are structures; --object {args.object} does not apply to "
                            f"{args.model}")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    shape = NETS_FOR_GRAPH[args.model]
    if args.model == "mobilenet-v2":
        model, weights = nets.mobilenet_v2_imagenet(), "ImageNet-1k (torchvision's checkpoint)"
        images = sample_image_crops(AGREEMENT_IMAGES, seed=0)
        calibration = list(sample_image_crops(32, seed=1).split(8))
        calibration_source = "32 crops of scikit-learn's sample photographs (seed 1)"
    else:
        model, weights = nets.build_net(args.model, seed=0).eval(), "untrained: random initialisation, seed 0"
        images = None
        calibration = list(torch.rand((32, *shape[1:]), generator=torch.Generator().manual_seed(1)).split(8))
        calibration_source = "32 uniform random inputs in [0, 1) (seed 1)"
    example = calibration[0][:1]
    has_norms = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if args.recalibrate_bn and not has_norms:
        raise PrunekitError(f"--recalibrate-bn: {args.model} has no BatchNorm layers")
    dense = copy.deepcopy(model)
    record = api.prune_structure(model, example, method=args.method or "taylor", remove=args.remove,
                                 remove_macs=args.remove_macs, allocation=args.allocation, round_to=args.round_to,
                                 seed=args.seed, calibration=calibration, progress=progress)
    record["model"].update(source=args.model, weights=weights)
    if record["calibration"] is not None:  # only the calibrated methods (taylor, activation) used it
        record["calibration"]["source"] = calibration_source
    metrics = record["metrics"]
    speeds = [{"macs": metrics["macs"]["before"]}, {"macs": metrics["macs"]["after"]}]
    if args.speed is not False:
        for entry, net in zip(speeds, (dense, model), strict=True):
            entry["latency"] = latency(net, example, batch_sizes=(1, 16), warmup=2, repeats=7)
    metrics["speed"] = {**speed_record(*speeds), "per": "image"}

    def agreement() -> float:
        with torch.inference_mode():
            agree = torch.cat([(dense(batch).argmax(1) == model(batch).argmax(1)) for batch in images.split(16)])
        return agree.float().mean().item()

    before = agreement() if images is not None else None
    if args.recalibrate_bn is not False and has_norms:
        # removed channels change what every BatchNorm sees; its dense statistics can collapse the network
        metrics["batchnorm_recalibration"] = {**recalibrate_batchnorm(model, calibration),
                                              "source": calibration_source}
    if images is not None:
        metrics["top1_agreement"] = {"agreement": agreement(), "images": len(images),
                                     "source": "crops of scikit-learn's sample photographs (seed 0)"}
        if "batchnorm_recalibration" in metrics:
            metrics["top1_agreement"]["before_recalibration"] = before
    api.save(model, None, out, record, overwrite=args.overwrite)
    record["output"] = str(out)
    return record


def local_path(source: str | None) -> str | None:
    """`source` if it names something on disk (a model directory, a text file), else None (an asset name)."""
    return source if source is not None and Path(source).exists() else None


def _run(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from prunekit import api
    from prunekit.assets import is_encoder, load_causal_lm
    from prunekit.data.embed import load_encoder
    from prunekit.depth.api import check_depth_options
    from prunekit.structure import check_structure_options

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    if args.verb == "prune" and args.model in NETS_FOR_GRAPH:
        return _prune_net(args, progress)
    if args.verb == "prune":
        if args.recalibrate_bn is not None:
            raise PrunekitError(f"--recalibrate-bn applies to networks with BatchNorm ({', '.join(NETS_FOR_GRAPH)}), "
                                f"not to {args.model}")
        args.method = args.method or "wanda"
        out = Path(args.out)
        encoder = is_encoder(args.model)
        # an encoder is calibrated on short texts and judged by its embeddings of held-out news, not perplexity
        defaults = (dict(calib_seq_len=128, eval_data="bbc-news", eval_seq_len=256, eval_windows=200) if encoder
                    else dict(calib_seq_len=512, eval_data="wiki-summaries", eval_seq_len=512, eval_windows=64))
        for option, value in defaults.items():
            if getattr(args, option) is None:
                setattr(args, option, value)
        calib, evaluation = args.calib, None if args.no_eval else args.eval_data
        check_distinct({"input model": local_path(args.model), "calibration file": local_path(calib),
                        "evaluation file": local_path(evaluation), "masks file": args.masks},
                       {"output directory": out, "masks output": args.save_masks})
        check_output_dir(out, args.overwrite)
        if args.save_masks is not None:
            check_output_file(args.save_masks, args.overwrite, what="masks output", example="masks.safetensors")
        kind = _prune_object(args)
        weight_options = {option: getattr(args, option) for option in _WEIGHT_OPTIONS
                          if getattr(args, option) is not None}
        if kind == "weights":
            for option in weight_options:
                applies_to, applies = _WEIGHT_OPTIONS[option]
                if not applies(args):
                    raise PrunekitError(f"--{option.replace('_', '-')} applies to {applies_to}, not to method "
                                        f"'{args.method}' with --allocation {args.allocation}")
            if (args.method == "given+admm") != (args.masks is not None):
                raise PrunekitError("method 'given+admm' applies the keep-masks of --masks FILE (written by "
                                    "--save-masks or prunekit.save_masks)" if args.masks is None else
                                    f"--masks applies to method 'given+admm'; '{args.method}' chooses its own")
            method_spec, _ = api.check_prune_options(args.method, args.sparsity, args.pattern, args.allocation,
                                                     args.blocksize, args.damping, **weight_options)
            if args.offload:
                from prunekit.weights.offload import check_offload_options

                check_offload_options(allocation=args.allocation, statistics=method_spec.statistics)
        elif kind == "structures":
            units = _units(args.units)
            if args.save_masks is not None and args.mode != "mask":
                raise PrunekitError("--save-masks for structures needs --mode mask: removed units leave no dense "
                                    "shapes for a mask to describe")
            check_structure_options(args.method, args.remove, args.allocation, mode=args.mode or "remove",
                                    round_to=args.round_to,
                                    reconstruct=args.reconstruct, remove_macs=args.remove_macs,
                                    **({"units": units} if units is not None else {}))
        else:
            check_depth_options(args.method, args.blocks, args.remove, unit=args.unit or "block",
                                merge=bool(args.merge))
        if encoder and kind == "weights":
            raise PrunekitError(f"{args.model} is an encoder: prunekit prunes its structures (--remove with "
                                f"{', '.join(names.STRUCTURE_METHODS)}) or blocks (--blocks), not its weights")
        if encoder and kind == "blocks" and args.method == "taylor":
            raise PrunekitError(f"{args.model} is an encoder: taylor needs a next-token loss; use angular, "
                                "block-influence, perplexity or sleb (embedding distance), reverse or random")
        if kind != "weights" and args.device is not None:
            raise PrunekitError(f"--device applies to pruning weights; {kind} are pruned where the model is")
        if kind == "blocks" and args.allocation != "uniform":
            raise PrunekitError("--allocation applies to weights and structures, not to blocks")
        api.check_lengths(args.model, calibration_seq_len=args.calib_seq_len,
                          eval_seq_len=None if evaluation is None else args.eval_seq_len)
        given_masks = api.load_masks(args.masks) if args.masks is not None else None
        if args.offload:
            model, tokenizer = api.load_offloaded(args.model)
            loaded = argparse.Namespace(model=model, tokenizer=tokenizer)
        else:
            loaded = load_encoder(args.model) if encoder else load_causal_lm(args.model)
        common = dict(calibration=calib, calibration_samples=args.calib_samples,
                      calibration_seq_len=args.calib_seq_len, seed=args.seed, evaluation=evaluation,
                      eval_seq_len=args.eval_seq_len, eval_windows=args.eval_windows or None,
                      batch_size=args.batch_size, progress=progress, model_source=args.model)
        if kind == "structures":
            result = api.prune_structure(loaded.model, loaded.tokenizer, method=args.method, remove=args.remove,
                                         remove_macs=args.remove_macs, mode=args.mode or "remove",
                                         allocation=args.allocation, round_to=args.round_to,
                                         reconstruct=args.reconstruct, speed=args.speed is not False,
                                         **({"units": units} if units is not None else {}), **common)
            record, chosen = result if args.mode == "mask" else (result, None)
        elif kind == "blocks":
            record = api.prune_depth(loaded.model, loaded.tokenizer, method=args.method, blocks=args.blocks,
                                     remove=args.remove, unit=args.unit or "block", merge=bool(args.merge),
                                     **common)
        else:
            result = api.prune(
                loaded.model, loaded.tokenizer, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                allocation=args.allocation, owl_threshold=args.owl_threshold, owl_limit=args.owl_limit,
                blocksize=args.blocksize, damping=args.damping, device=args.device, masks=given_masks,
                return_masks=args.save_masks is not None, **weight_options, **common)
            record, chosen = result if args.save_masks is not None else (result, None)
            if given_masks is not None:
                record["method"].update(masks_file=args.masks, masks_sha256=file_sha256(args.masks))
        with Staging(overwrite=args.overwrite) as stage:  # the model and its masks appear together or not at all
            if args.save_masks is not None:
                api.save_masks(chosen, stage.path(args.save_masks))
            api.save(loaded.model, loaded.tokenizer, stage.path(out, directory=True), record,
                     overwrite=args.overwrite)
        record["output"] = str(out)
        if args.save_masks is not None:
            record["output_masks"] = str(args.save_masks)
        return record
    if args.tokens is not None:
        from prunekit.tokens import evaluate_tokens

        if args.device is not None:
            raise PrunekitError("--device does not apply to --tokens: token pruning is measured on the CPU")
        return evaluate_tokens(args.model, args.tokens, data=args.data, seq_len=args.seq_len, windows=args.windows,
                               batch_size=args.batch_size, continuation=args.continuation or 64, progress=progress)
    if args.continuation is not None:
        raise PrunekitError("--continuation applies to --tokens on decoders")
    seq_len, windows = args.seq_len or 512, 64 if args.windows is None else args.windows
    api.check_lengths(args.model, eval_seq_len=seq_len)
    loaded = load_causal_lm(args.model)
    return api.evaluate(loaded.model, loaded.tokenizer, data=args.data or "wiki-summaries", seq_len=seq_len,
                        windows=windows or None, batch_size=args.batch_size or 4, device=args.device,
                        progress=progress, model_source=args.model)


def _budget_lines(metrics: dict, method: dict) -> list[str]:
    """What was removed, target beside achieved: sparsity for weights, parameters for structures and blocks."""
    if "removed_fraction" not in metrics:
        sparsity = metrics["sparsity"]
        return [f"method     {method['name']}, {method['pattern']}, allocation {method['allocation']}",
                f"sparsity   target {sparsity['target']:.4f}, achieved {sparsity['achieved']:.4f} "
                f"of {sparsity['numel']:,} block weights"]
    fraction, parameters = metrics["removed_fraction"], metrics["parameters"]
    target = "" if fraction["target"] is None else f"target {fraction['target']:.4f}, "
    allocation = f", allocation {method['allocation']}" if "allocation" in method else ""
    lines = [f"method     {method['name']}{allocation}",
             f"removed    {target}achieved {fraction['achieved']:.4f} of the parameters "
             f"({parameters['before']:,} -> {parameters['after']:,})"]
    macs = metrics.get("macs_removed_fraction")
    if macs and macs["target"] is not None:
        lines.append(f"MAC budget target {macs['target']:.4f}, achieved {macs['achieved']:.4f} of the MACs")
    if "removed_blocks" in metrics:
        lines.append(f"blocks     removed {metrics['removed_blocks']} ({metrics['blocks']['before']} -> "
                     f"{metrics['blocks']['after']})")
    if metrics.get("removed_sublayers"):
        lines.append(f"sublayers  removed {metrics['removed_sublayers']}")
    return lines


def _speed_lines(speed: dict | None) -> list[str]:
    """MACs before and after with the ideal speedup, the timed forward passes, and the warning if not faster."""
    if not speed:
        return []
    macs = speed["macs"]
    lines = [f"MACs       {macs['before']:,} -> {macs['after']:,} per {speed.get('per', 'sequence')} "
             f"({macs['removed_fraction']:.1%} "
             f"removed; ideal speedup {speed['ideal_speedup']:.2f}x)"]
    if "latency" in speed:
        timings = ", ".join(f"batch {size} {entry['before']:.1f} -> {entry['after']:.1f} ms ({entry['speedup']:.2f}x)"
                            for size, entry in speed["latency"].items())
        lines.append(f"latency    {timings}, {speed['threads']} threads, medians")
    if speed.get("warning"):
        lines.append(f"warning    {speed['warning']}")
    return lines


def _summary(record: dict) -> str:
    metrics, method = record["metrics"], record["method"]
    if method["name"] == "tokens":
        from prunekit.tokens.evaluate import summary

        return summary(record)
    lines = [f"model      {record['model']['source']} ({record['model']['parameters']:,} parameters)"]
    if "weights" in record["model"]:
        lines.append(f"weights    {record['model']['weights']}")
    if method["name"] != "none":
        lines += _budget_lines(metrics, method)
        prune_res = record["resources"]["prune"]
        lines.append(f"pruning    {prune_res['wall_s']:.1f} s, peak memory {prune_res['peak_rss_mb']:.0f} MB")
        evaluation = record.get("evaluation")
        lines += _speed_lines(metrics.get("speed"))
        if "top1_agreement" in metrics:
            agreement = metrics["top1_agreement"]
            before = agreement.get("before_recalibration")
            lines.append(f"agreement  top-1 with the dense model {agreement['agreement']:.4f} on "
                         f"{agreement['images']} {agreement['source']}"
                         + ("" if before is None else f" ({before:.4f} before BatchNorm recalibration)"))
        if evaluation and "embedding_fidelity" in metrics:
            fidelity = metrics["embedding_fidelity"]
            lines.append(f"embeddings mean cosine to dense {fidelity['mean_cosine']:.4f} (min "
                         f"{fidelity['min_cosine']:.4f}) on {fidelity['texts']} texts of {evaluation['source']}")
        elif evaluation:
            lines.append(f"perplexity dense {metrics['dense']['perplexity']:.2f} -> pruned "
                         f"{metrics['pruned']['perplexity']:.2f} ({evaluation['windows']} windows × "
                         f"{evaluation['seq_len']} tokens of {evaluation['source']})")
        if "output" in record:
            lines.append(f"saved      {record['output']}")
        if "output_masks" in record:
            lines.append(f"masks      {record['output_masks']}")
    else:
        lines.append(f"perplexity {metrics['perplexity']:.2f} ({metrics['windows']} windows × {metrics['seq_len']} "
                     f"tokens of {record['evaluation']['source']}), sparsity {metrics['sparsity']:.4f}")
    return "\n".join(lines)


def _environment_error(error: OSError, output: str | None) -> str:
    """One line for a failure of the machine rather than of the input: a full disk, a read-only place, a denial."""
    where = error.filename or output
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device"
    place = f" at '{where}'" if where else ""
    return one_line(f"prunekit: error: {reason}{place}; nothing was written (free space or choose another place)")


def one_line(message: str, limit: int = 400) -> str:
    """A message as one printable line: a library's multi-line or binary text (a CSV parser quoting the bytes of a
    binary file) must not flood the terminal."""
    flat = " ".join(str(message).split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        record = args.run(args) if "run" in args else _run(args)
    except PrunekitError as exc:
        print(f"prunekit: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        print(_environment_error(exc, getattr(args, "out", None)), file=sys.stderr)
        return 1
    except Exception as exc:  # an internal error: say so in one line, keep the traceback out of the user's way
        if "No space left on device" in str(exc):  # safetensors' writer reports a full disk as its own error
            print(_environment_error(OSError(errno.ENOSPC, str(exc)), getattr(args, "out", None)), file=sys.stderr)
            return 1
        print(f"prunekit: internal error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
    summary = args.summary if "summary" in args else _summary
    print(json.dumps(record, indent=2) if args.json else summary(record))
    return 0


def run() -> None:
    """The console entry point: `main`, with Ctrl-C during start-up answered like Ctrl-C during work.

    After Ctrl-C the process ends at once (`os._exit`): a library's worker thread caught mid-task (a loader's thread
    pool) would otherwise hold the interpreter's shutdown. Outputs are already cleaned up by then (temporaries are
    removed where the interrupt unwinds through the writers), and the streams are flushed first."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("prunekit: interrupted; nothing was written", file=sys.stderr)
        code = 130
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
