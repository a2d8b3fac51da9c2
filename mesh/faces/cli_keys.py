"""`meshctl keys`: CURVE keypairs for the data plane (see mesh.node.security)."""
from __future__ import annotations

import argparse
import sys

from mesh.errors import MeshError


def cmd_keys_generate(args) -> int:
    from mesh.node.security import generate_keypair
    try:
        public_path, secret_path = generate_keypair(args.dir, args.name, force=args.force)
    except MeshError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the directory is not writable, or a directory holds the name
        print(f"meshctl: cannot write the keypair in {args.dir}: {exc}", file=sys.stderr)
        return 2
    public = public_path.read_text().split('public-key = "', 1)[1].split('"', 1)[0]
    print(f"secret key: {secret_path} (mode 0600: keep it on node {args.name}; meshd --curve-key {secret_path})")
    print(f"public key: {public_path} (copy it into the --curve-allow directory of every node)")
    print(f"            {public}")
    return 0


def add_keys_commands(sub) -> None:
    group = sub.add_parser("keys", help="CURVE keypairs that encrypt and authenticate the data plane")
    commands = group.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    p = commands.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (0600)",
                            description="Write a keypair for node NAME: NAME.key_secret stays on that node "
                                        "(meshd --curve-key), NAME.key goes into every node's allowlist directory "
                                        "(meshd --curve-allow). Name it after the node id: a node's workers may only "
                                        "speak for the node their key names.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="the node id this keypair belongs to")
    p.add_argument("--dir", default=".", help="where to write the files (default: the current directory)")
    p.add_argument("--force", action="store_true", help="replace an existing keypair of that name")
    p.set_defaults(func=cmd_keys_generate)
