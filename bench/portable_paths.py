"""Published results travel with the repository, so the paths in them must not name this machine.

Every absolute path under the repository is written relative to its root, and one in the shared
folder beside the repository as `../...`; anything else is left as it is.
"""

from __future__ import annotations

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
        parent = root.rsplit("/", 1)[0]
        text = re.sub(PATH_START + re.escape(root) + r"(?=$|[\s,])", ".", value)
        text = re.sub(PATH_START + re.escape(root + "/"), "", text)
        return re.sub(PATH_START + re.escape(parent + "/"), "../", text)
    return value
