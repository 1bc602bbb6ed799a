"""The Makefile's set-up: tools/pip_settings.py hands uv the places pip installs from, so that both pick the same
versions. Checked on hand-written `pip config list` lines, and through pip itself with settings given only in PIP_*
variables (PIP_CONFIG_FILE=/dev/null: pip then reads no config file, so the machine's own settings stay out)."""

import os
import shlex
import subprocess
import sys

from tools.pip_settings import uv_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_uv_flags_from_pip_config_lines():
    lines = ["global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
             "global.find-links='/opt/wheels'",
             "global.constraint='/etc/xdg/pip/constraints.txt'",
             "global.cert='/etc/ssl/certs/ca-certificates.crt'",  # not where packages come from: left out
             ":env:.find-links='/opt/wheels'",  # the same folder again, from PIP_FIND_LINKS: once
             ":env:.timeout='180'",
             "user.index-url='https://example.invalid/simple'"]
    assert uv_flags(lines) == ["--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
                               "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt",
                               "--index-url", "https://example.invalid/simple"]
    assert uv_flags([]) == []


def test_pip_settings_reads_what_pip_reads():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="https://example.invalid/simple",
               PIP_EXTRA_INDEX_URL="file:///a/simple file:///b/simple", PIP_FIND_LINKS="/wheels",
               PIP_CONSTRAINT="/c.txt")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pip_settings.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    flags = shlex.split(out)
    pairs = sorted(zip(flags[::2], flags[1::2]))
    assert pairs == [("--constraint", "/c.txt"), ("--extra-index-url", "file:///a/simple"),
                     ("--extra-index-url", "file:///b/simple"), ("--find-links", "/wheels"),
                     ("--index-url", "https://example.invalid/simple")]
