"""Published results travel with the repository, so the paths in them must not name this machine.

Every absolute path under the folder that holds the repository (the checkout itself and the shared
data beside it) is written relative to the repository's root; anything else is left as it is.
"""

from __future__ import annotations

import os
import re

from configs import REPO_ROOT

# a path starts a string or follows a separator of a joined list, a command line or a flag=value
PATH_START = r"(?:^|(?<=[\s,=]))"


def repository_relative(value: object, root: str = str(REPO_ROOT)) -> object:
    """`value` (a JSON-like tree) with the repository's absolute paths made relative to its root."""
    if isinstance(value, dict):
        return {key: repository_relative(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [repository_relative(item, root) for item in value]
    if isinstance(value, str):
        beside_root = PATH_START + re.escape(os.path.dirname(root)) + r"(?=$|[/\s,])[^\s,]*"
        return re.sub(beside_root, lambda path: os.path.relpath(path[0], root), value)
    return value
