"""
nanoGPT-style configuration, with checking.

A stage script keeps its knobs as module-level values, then calls

    from configurator import configure
    config = configure(globals())

which applies, in order, each `config/<name>.py` preset named on the command line (a file of plain
assignments) and each `--key=value` override (the value parsed as a Python literal, falling back to a
bare string for string keys). A key the script does not define, or a value whose type does not match the
default's, stops the script with a message that names it (ConfigError, a SystemExit). Returns the final {key: value} dict for logging and checkpoints.
"""

import ast
import sys

CONFIG_TYPES = (int, float, bool, str, tuple, list, dict, type(None))


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


def configure(namespace, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known = config_keys(namespace)
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
                raise ConfigError(f"argument '{arg}': expected --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in known:
                close = [k for k in known if k.split("_")[0] == key.split("_")[0]]
                hint = f" (did you mean {close}?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
            value = parse_value(key, text, known[key])
            namespace[key] = known[key] = check_type(key, value, known[key], f"--{key}")
    return dict(known)
