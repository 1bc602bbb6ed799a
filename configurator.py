"""
nanoGPT-style configuration, with checking.

A stage script keeps its knobs as module-level values, then calls

    from configurator import configure
    config = configure(globals())

which applies, in order, each `config/<name>.py` preset named on the command line (a file of plain
assignments) and each `--key=value` override (the value parsed as a Python literal, falling back to a
bare string for string keys). A key the script does not define, or a value whose type does not match the
default's, stops the script with a message that names it (ConfigError, a SystemExit). Returns the final {key: value} dict for logging and checkpoints.

The knobs are the names assigned in the calling script's knob block: the lines from a `# -- knobs` comment
to `configure(` or the closing `# ---` rule (module-level assignments, or the keywords of a dict(...) of
defaults). `--help` (or `-h`) prints them with their defaults and the comments on their lines, read from
that block, and exits 0: the help cannot drift from the code. A caller without such a block (a test's dict)
has every public value of a simple type as a knob, and a help without comments.
"""

import ast
import io
import os
import sys
import tokenize

CONFIG_TYPES = (int, float, bool, str, tuple, list, dict, type(None))
HELP_FLAGS = ("--help", "-h")


class ConfigError(SystemExit):
    """A bad preset file or --key=value: the script stops with this message (no traceback) and exit code 1."""

    def __str__(self):
        return str(self.code)


def config_keys(namespace):
    """The knobs of a script: its public module-level values of simple types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, CONFIG_TYPES) and not callable(v)}


def check_type(key, value, default, source):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r} must be True or False")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(f"{source}: {key}={value!r} is {type(value).__name__}, "
                          f"expected {type(default).__name__} (default {default!r})")
    return value


def parse_value(key, text, default):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(default, str) or default is None:
            return text  # --init_from=scratch, --device=cuda
        raise ConfigError(f"--{key}={text}: not a Python literal (expected {type(default).__name__})") from None


def knob_block(path):
    """The knob block of a script -> [(names assigned on one line, their comment)] in source order, the
    comment joined with the comment-only lines that continue it; None when the file has no `# -- knobs` line."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    start = next((i for i in sorted(comments) if comments[i].startswith("-- knobs")), None)
    if start is None:
        return None
    end = next((i for i, line in enumerate(lines[start:], start + 1)
                if line.lstrip().startswith("#") and comments.get(i, "").startswith("--") or "configure(" in line),
               len(lines))
    assigned = {}  # line -> (names, last line of the statement)
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Assign) and start < node.lineno < end:
            names = [n.id for t in node.targets for n in (t.elts if isinstance(t, ast.Tuple) else [t])
                     if isinstance(n, ast.Name)]
        elif isinstance(node, ast.keyword) and node.arg and start < node.lineno < end:  # dict(key=value, ...)
            names = [node.arg]
        else:
            continue
        assigned[node.lineno] = (assigned.get(node.lineno, ([], 0))[0] + names, node.end_lineno)
    block = []
    for line, (names, last) in sorted(assigned.items()):
        text = [comments[i] for i in range(line, last + 1) if i in comments][:1]
        for i in range(last + 1, end):  # comment-only lines right below continue the comment
            if not lines[i - 1].lstrip().startswith("#"):
                break
            text.append(comments[i])
        block.append((names, " ".join(text)))
    return block


def help_text(path, block, known):
    """Usage, the script's docstring up to its design notes, then each knob with its default and comment."""
    script = os.path.basename(path) if path else "script"
    head = [f"usage: {script} [config/<name>.py ...] [--key=value ...]"]
    if path:
        with open(path) as f:
            head.append((ast.get_docstring(ast.parse(f.read())) or "").split("Design choices")[0].strip())
    head.append("knobs and their defaults (--key=value takes a Python literal, or a bare word for a string knob;\n"
                "a config/*.py file sets the same names):")
    lines = []
    for names, comment in block if block is not None else [([k], "") for k in known]:
        names = [n for n in names if n in known]
        if not names:
            continue
        knob = "  " + " ".join(f"--{n}={known[n]!r}" for n in names)
        if comment:  # in a column when the knob leaves room, else on the next line
            knob += f"{'':{34 - len(knob)}}# {comment}" if len(knob) <= 32 else f"\n{'':34}# {comment}"
        lines.append(knob)
    return "\n\n".join(part for part in head if part) + "\n" + "\n".join(lines)


def configure(namespace, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = sys._getframe(1).f_globals.get("__file__")  # the calling script, whose knob block says what a knob is
    block = knob_block(path) if path and path.endswith(".py") else None
    known = config_keys(namespace)
    if block is not None:  # the block says what a knob is; other module-level values are not settable
        in_block = {name for names, _ in block for name in names}
        known = {k: v for k, v in known.items() if k in in_block}
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text(path, block, known))
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            # a preset file: plain Python assignments
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise ConfigError(f"config file '{arg}': {e.strerror}") from None
            preset = {}
            exec(compile(code, arg, "exec"), {}, preset)
            for key, value in preset.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in known:
                    raise ConfigError(f"config file '{arg}': unknown key {key!r}")
                namespace[key] = known[key] = check_type(key, value, known[key], f"config file '{arg}'")
        else:
            if "=" not in arg:
                raise ConfigError(f"argument '{arg}': expected --key=value (--help lists the knobs)")
            key, text = arg[2:].split("=", 1)
            if key not in known:
                close = [k for k in known if k.split("_")[0] == key.split("_")[0]]
                hint = f" (did you mean {close}?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}; --help lists the knobs")
            value = parse_value(key, text, known[key])
            namespace[key] = known[key] = check_type(key, value, known[key], f"--{key}")
    return dict(known)
