"""pip's own settings for where packages come from, printed as `uv pip install` flags, so that the Makefile's uv picks
the versions pip would: the index, the extra indexes, the find-links folders and the constraint files of every place
pip reads them (`pip config list`: its config files and PIP_* variables). A machine that sets none prints nothing.

    uv pip install $(python tools/pip_settings.py) -r requirements.txt     # what the Makefile does
"""

import ast
import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}  # pip's setting -> uv's flag (the same meaning)


def uv_flags(config_lines):
    """`pip config list` lines ("global.find-links='/opt/wheels'", ":env:.constraint='a.txt b.txt'") -> the flags,
    each value once, in the order met; a setting's list may be space- or newline-separated, as pip reads it."""
    flags, seen = [], set()
    for line in config_lines:
        key, sep, value = line.partition("=")
        flag = FLAGS.get(key.rsplit(".", 1)[-1])
        if not sep or flag is None:
            continue
        for item in ast.literal_eval(value).split():
            if (flag, item) not in seen:
                seen.add((flag, item))
                flags += [flag, item]
    return flags


if __name__ == "__main__":
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    print(shlex.join(uv_flags(listed.stdout.splitlines())))
