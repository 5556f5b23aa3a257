"""Where the shipped Hydra configs live: inside the installed package, or at the top of a source checkout."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"kdrun's conf/ directory is missing (looked in {PACKAGE_DIR})")
