"""`kdrun ls ...` (what exists) and `kdrun compare ...` (result tables)."""
from __future__ import annotations


from rich.console import Console
from rich.table import Table

from kdrun.errors import ConfigError, OneLineParser

LIBRARIES = ("timm", "torchvision")  # kdrun.models.library's; named here so that `kdrun ls` imports no model

out = Console()


def run_subcommand(name: str, args: list[str]) -> int:
    if name == "ls":
        return ls_command(args)
    from kdrun.compare import compare_command

    return compare_command(args)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input={text} is not allowed: give CxHxW, e.g. 3x32x32")
    return shape


def ls_command(args: list[str]) -> int:
    parser = OneLineParser(prog="kdrun ls", description="List registry entries.")
    parser.add_argument("what", choices=("models", "methods", "datasets", "transfers", "layers"))
    parser.add_argument("model", nargs="?", help="model name (for `ls layers`)")
    parser.add_argument("--dataset", help="`ls layers`: take the input shape and classes of this dataset "
                                           "(default: the configured one, digits)")
    parser.add_argument("--input", help="input shape CxHxW for `ls layers` (default: the dataset's)")
    parser.add_argument("--classes", type=int, help="number of classes for `ls layers` (default: the dataset's)")
    parser.add_argument("--fx", action="store_true",
                        help="`ls layers` also lists the torch.fx node names (tap them as fx:NODE) with their shapes")
    for library in LIBRARIES:
        parser.add_argument(f"--{library}", metavar="PATTERN", nargs="?", const="*",
                            help=f"`ls models`: {library}'s models matching PATTERN (default *), as {library}/NAME")
    opts = parser.parse_args(args)
    wanted = [library for library in LIBRARIES if getattr(opts, library) is not None]
    if wanted and opts.what != "models":
        raise ConfigError(f"--{wanted[0]} is not allowed with `kdrun ls {opts.what}`: it lists models "
                          f"(kdrun ls models --{wanted[0]} PATTERN)")
    if wanted:
        return ls_library_models(wanted[0], getattr(opts, wanted[0]))
    if opts.what == "layers":
        if not opts.model:
            raise ConfigError("`kdrun ls layers` needs a model name, e.g. kdrun ls layers resnet26")
        shape, classes = dataset_shape(opts.dataset)
        return ls_layers(opts.model, parse_shape(opts.input) if opts.input else shape, opts.classes or classes,
                         opts.fx)
    registry = registry_of(opts.what)
    table = Table(title=f"kdrun {opts.what}")
    table.add_column("name", style="bold")
    table.add_column("description")
    if opts.what == "methods":
        table.add_column("follows (official code; deliberate differences)")
    for entry in registry.names():
        cells = [entry, registry.describe(entry)]
        if opts.what == "methods":
            cells.append(registry.get(entry).official_code or "-")
        table.add_row(*cells)
    out.print(table)
    if opts.what == "methods":
        out.print(modifier_table(registry))
    if opts.what == "models":
        out.print("Also timm's and torchvision's models, as timm/NAME (pip install kdrun[timm]) and torchvision/NAME; "
                  "list them with kdrun ls models --timm 'PATTERN' or --torchvision 'PATTERN'",
                  highlight=False, markup=False)
    return 0


def ls_library_models(library: str, pattern: str) -> int:
    """One `library/NAME` per line (a pattern such as 'resnet*' or '*vit*'), for grep and the shell."""
    from kdrun.models.library import backend

    lib = backend(library)
    if not lib.available():
        raise ConfigError(f"--{library} needs {library}, which is not installed: {lib.INSTALL}")
    names = lib.model_names(pattern, pattern)
    if not names:
        raise ConfigError(f"--{library} {pattern}: no {library} model matches it (try '*{pattern.strip('*')}*')")
    for name in names:
        out.print(f"{library}/{name}", highlight=False, markup=False, soft_wrap=True)
    return 0


def modifier_table(methods) -> Table:
    """The keys that modify several methods, and which methods take them."""
    from omegaconf import OmegaConf

    from kdrun.paths import conf_dir

    def with_key(key: str) -> list[str]:
        return [n for n in methods.names() if key in OmegaConf.load(conf_dir() / "method" / f"{n}.yaml")]

    def standardizable() -> str:  # the methods with a logit-distillation term; `+` where the YAML lacks the key
        names = [n for n in methods.names() if methods.get(n).ls_terms]
        listed = with_key("logit_standardize")
        return ", ".join(n if n in listed else f"{n} (+method.logit_standardize)" for n in names)

    table = Table(title="kdrun method modifiers")
    table.add_column("key", no_wrap=True)
    table.add_column("paper (official code)")
    table.add_column("methods")
    table.add_row("method.logit_standardize", "Sun et al. 2024, Logit Standardization in KD "
                  "(sunshangquan/logit-standardization-KD)", standardizable())
    table.add_row("method.dot", "Zhao et al. 2023, DOT: A Distillation-Oriented Trainer (mdistiller engine/dot.py)",
                  f"{', '.join(with_key('dot'))}; any other method as +method.dot=true")
    return table


def dataset_shape(name: str | None) -> tuple[tuple[int, ...], int]:
    """Input shape and classes of the named dataset, or of the one `conf/config.yaml` chooses."""
    from kdrun.data import DATASETS
    from kdrun.data.registry import INPUT_SHAPES

    if name is None:
        from kdrun.config_store import compose_config

        name = str(compose_config([]).dataset.name)
    if name not in DATASETS:
        raise ConfigError(DATASETS.unknown_message(name, key="--dataset"))
    if name not in INPUT_SHAPES:
        raise ConfigError(f"--dataset {name}: its image size is the user's; give --input CxHxW and --classes N")
    return INPUT_SHAPES[name]


def registry_of(what: str):
    if what == "models":
        from kdrun.models import MODELS

        return MODELS
    if what == "methods":
        from kdrun.methods import METHODS

        return METHODS
    if what == "transfers":
        from kdrun.transfer import TRANSFERS

        return TRANSFERS
    from kdrun.data import DATASETS

    return DATASETS


def ls_layers(name: str, input_shape: tuple[int, ...], classes: int, fx: bool = False) -> int:
    from kdrun.features import fx_node_table, layer_table
    from kdrun.models import create_model
    from kdrun.models.library import check_runs_at

    model = create_model(name, num_classes=classes, in_channels=input_shape[0])
    check_runs_at(model, input_shape, name, "give a larger --input, e.g. --input 3x224x224")
    input_text = "x".join(map(str, input_shape))
    table = Table(title=f"{name} layers for input {input_text}")
    for column in ("alias", "module path", "shape"):
        table.add_column(column)
    for alias, path, shape in layer_table(model, input_shape):
        table.add_row(alias, path, " x ".join(map(str, shape)))
    out.print(table)
    if fx:
        nodes = Table(title=f"{name} torch.fx nodes for input {input_text} (pair them as fx:NODE)")
        for column in ("fx node", "output shape"):
            nodes.add_column(column)
        for node, shape in fx_node_table(model, input_shape):
            nodes.add_row(node, " x ".join(map(str, shape)))
        out.print(nodes)
    return 0
