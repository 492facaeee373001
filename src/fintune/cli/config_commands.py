"""`fintune settings`: the effective settings of a profile after environment overrides, as YAML."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from fintune.cli._app import ProfileOption, app, console
from fintune.config import available_profiles, config_dir, load_settings, printable
from fintune.errors import ConfigError


@app.command("settings")
def settings_command(
    profile: ProfileOption = None,
    list_profiles: Annotated[bool, typer.Option("--list", help="Only list the profiles in configs/.")] = False,
) -> None:
    """Print every setting of a profile as YAML, with FINTUNE_* environment overrides applied."""
    if list_profiles:
        if profile is not None:
            raise typer.BadParameter("--list shows every profile: drop --profile, or drop --list", param_hint="--list")
        if not available_profiles():
            raise ConfigError(f"no profiles (*.yaml) in {config_dir()}: check FINTUNE_CONFIG_DIR")
        for name in available_profiles():
            console.print(f"{name:<14} {load_settings(name).description}", highlight=False)
        return
    values = printable(load_settings(profile))
    console.print(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), highlight=False, soft_wrap=True)
