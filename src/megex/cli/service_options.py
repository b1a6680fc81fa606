"""`megex serve`'s options for the service's settings, made from their declarations
(:class:`megex.serving.settings.ServiceSettings`): each option's default, type, rule and
help are its setting's, written once on the dataclass field. Only the option's name, and
the unit it counts in where that is not the setting's own (MB for bytes), are written here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..serving.settings import ServiceSettings
from ..settings import Choice, Number, OrNone, SettingError, default_of
from .errors import UsageError

__all__ = [
    "GROUP_TITLES",
    "SETTING_OPTIONS",
    "SettingOption",
    "add_setting_options",
    "read",
    "setting_default",
]

MiB = 1024 * 1024

# The help groups of `serve`, by the group of the settings they hold (the others' options
# go to the command's own list).
GROUP_TITLES = {
    "keys": "keys and quotas",
    "limits": "limits against costly or hostile clients",
    "answers": "what the service returns",
    "disclosure": "what a caller with a key may read about the service",
}


@dataclass(frozen=True)
class SettingOption:
    """The option that sets `setting`; its value times `scale` is the setting's."""

    setting: str
    flag: str
    metavar: str | None = None
    scale: int = 1

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def field(self) -> dataclasses.Field:
        return _FIELDS[self.setting]

    def add_to(self, group: Any) -> None:
        """Add the option to an argparse parser or group, as its setting declares it."""
        f = self.field
        check, default, text = f.metadata["check"], default_of(f), f.metadata["help"]
        if isinstance(check, Choice) and check.kind is bool:
            group.add_argument(self.flag, action="store_true", default=default, help=text)
            return
        if isinstance(check, Choice):
            group.add_argument(self.flag, choices=check.options, default=default, help=text)
            return
        number = _number(check)
        kind = number.kind if number is not None else str
        if self.scale != 1:  # a fraction of the unit is still a whole number of bytes
            text, kind = f"{text}, in {self.metavar}", float
            default = None if default is None else default / self.scale
        group.add_argument(self.flag, type=kind, default=default, metavar=self.metavar, help=text)

    def read(self, args: argparse.Namespace) -> Any:
        """The setting's value from the parsed option, checked by the setting's rule; a
        UsageError names the option and states the rule in the option's unit."""
        given = getattr(args, self.dest)
        value = given if given is None or self.scale == 1 else int(given * self.scale)
        check = self.field.metadata["check"]
        try:
            check.check(self.setting, value)
        except SettingError as err:
            number = _number(check)
            if number is None:
                raise UsageError(str(err).replace(self.setting, self.flag, 1)) from None
            shown = dataclasses.replace(
                number, low=number.low / self.scale, high=number.high / self.scale
            )
            raise UsageError(f"{self.flag}: expected{shown.rule()}, got {given}") from None
        return value


def _number(check: Any) -> Number | None:
    """The Number rule of a check (also inside OrNone), or None for another kind."""
    check = check.inner if isinstance(check, OrNone) else check
    return check if isinstance(check, Number) else None


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceSettings)}

SETTING_OPTIONS = (
    SettingOption("name", "--name"),
    SettingOption("budget", "--budget", "N"),
    SettingOption("audit_images", "--audit-images"),
    SettingOption("rate_limit", "--rate-limit", "R"),
    SettingOption("max_body_bytes", "--max-body-mb", "MB", MiB),
    SettingOption("body_timeout_s", "--body-timeout", "S"),
    SettingOption("max_json_values", "--max-json-values", "N"),
    SettingOption("max_passes_per_request", "--max-passes-per-request", "N"),
    SettingOption("compute_rate", "--compute-rate", "P"),
    SettingOption("chunk_passes", "--chunk-passes", "N"),
    SettingOption("failed_key_rate", "--failed-key-rate", "R"),
    SettingOption("failed_key_burst", "--failed-key-burst", "B"),
    SettingOption("idempotency_ttl_s", "--idempotency-ttl", "S"),
    SettingOption("stored_response_bytes_per_key", "--stored-responses-mb-per-key", "MB", MiB),
    SettingOption("stored_response_bytes", "--stored-responses-mb", "MB", MiB),
    SettingOption("prediction", "--prediction"),
    SettingOption("top_k", "--top-k", "K"),
    SettingOption("seed", "--seed"),
    SettingOption("openapi", "--openapi"),
    SettingOption("expose_architecture", "--expose-architecture"),
)


def add_setting_options(parser: argparse.ArgumentParser, groups: dict[str, Any]) -> None:
    """Every option of :data:`SETTING_OPTIONS`, in the group of its setting (`groups`, by
    the settings' group; the parser itself for the others)."""
    for option in SETTING_OPTIONS:
        option.add_to(groups.get(option.field.metadata["group"], parser))


def read(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that the options set, by name, each checked by its rule."""
    return {option.setting: option.read(args) for option in SETTING_OPTIONS}


def setting_default(name: str) -> Any:
    """The default of the service's setting `name` (for an option written by hand)."""
    return default_of(_FIELDS[name])
