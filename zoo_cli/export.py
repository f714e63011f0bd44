"""`zoo export` and `zoo publish`: a training run -> model_cards/NAME/ -> a Hugging Face Hub repository.

    zoo export runs/wmse-fashion_mnist-20250101-120000 --name wmse-resnet18_narrow.fmnist [--fp16]
    zoo publish model_cards/wmse-resnet18_narrow.fmnist --repo-id ssl-zoo/wmse-resnet18_narrow.fmnist
"""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_export(args: argparse.Namespace) -> int:
    from export.publish import export_model

    result = export_model(args.checkpoint, args.name, results=args.results, fp16=args.fp16, out_dir=args.out,
                          opset=args.opset, force=args.force, update_registry=not args.no_registry,
                          onnx_in_folder=not args.onnx_on_first_use)
    spec = result.spec
    parity = ", ".join(f"{kind} ({n}) {diff:.1e}" for kind, (n, diff) in result.parity.items())
    measured = ", ".join(f"{k} {v:.2f}" for k, v in spec.metrics.items()) or "no results.json: not measured"
    print(f"exported {spec.name} to {result.folder}")
    print(f"  sha256 {spec.sha256}; ONNX max |diff| {parity}; metrics: {measured}")
    if not args.no_registry:
        print(f"  registry row updated; publish with: zoo publish {result.folder} --repo-id {spec.hub_repo}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from export.publish import publish_folder

    result = publish_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                            commit_message=args.message)
    print(f"published {args.folder} to {result.repo_id}"
          + (f" at commit {result.commit}" if result.commit else "") + (f" ({result.url})" if result.url else ""))
    if result.commit:
        print(f"  pin it with zoo.load(NAME, revision={result.commit!r})")
    return 0


def register(subparsers: Any) -> None:
    """Add the `export` and `publish` sub-commands to `zoo`'s argparse sub-parsers."""
    p = subparsers.add_parser(
        "export", help="write model_cards/NAME/ (safetensors, ONNX, config.json, model card) from a checkpoint",
        description="Export a `zoo train` checkpoint as model_cards/NAME/, the exact content of its Hub repository, "
                    "and record its sha256 and measured metrics in zoo/pretrained.json.")
    p.add_argument("checkpoint", help="run folder written by `zoo train`, or its checkpoint.pt, or a folder written "
                                      "by `zoo export` (re-card it: its numbers kept, --results adds new ones)")
    p.add_argument("--name", required=True, help="full registry name, e.g. wmse-resnet18_narrow.fmnist (zoo list)")
    p.add_argument("--results", default=None,
                   help="results.json of the evaluation (default: results.json beside the checkpoint; "
                        "absent = 'not measured')")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (they load back as fp32)")
    p.add_argument("--out", default=None, help="folder that receives NAME/ (default: model_cards/ or "
                                               "$SSL_ZOO_MODEL_CARDS)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    p.add_argument("--force", action="store_true", help="replace an existing model_cards/NAME/")
    p.add_argument("--no-registry", action="store_true", help="do not update zoo/pretrained.json")
    p.add_argument("--onnx-on-first-use", action="store_true",
                   help="check the ONNX export but leave model.onnx out of the folder (a large model kept out of "
                        "git); the card says so and `zoo publish` builds it before uploading (a re-card keeps "
                        "the folder's choice)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "publish", help="upload an exported folder to a Hugging Face Hub model repository",
        description="Create the Hub repository if needed and upload model_cards/NAME/ to it. The token comes from "
                    "HF_TOKEN or `hf auth login` and is never printed.")
    p.add_argument("folder", help="folder written by `zoo export`, e.g. model_cards/wmse-resnet18_narrow.fmnist")
    p.add_argument("--repo-id", default=None, help="ORG/NAME (default: the hub_repo in its config.json)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=_cmd_publish)
