"""The price table: the shipped prices, the operator's file, snapshot matching and what a cost is."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from openai_proxy import create_app
from openai_proxy.config import ConfigError, build_config
from openai_proxy.observe.prices import ModelPrice, PriceTable, cost_of, load_prices
from tests.conftest import ROOT, base_env

# What the brief promises operators the shipped table covers.
REQUIRED = (
    "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini",
    "o1", "o1-mini", "o3", "o3-mini", "o4-mini", "gpt-4o-audio-preview", "gpt-4o-mini-audio-preview",
    "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "whisper-1", "text-embedding-3-small",
    "text-embedding-3-large", "text-embedding-ada-002", "gpt-4-turbo", "gpt-3.5-turbo",
)  # fmt: skip


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return load_prices()


def test_the_shipped_table_covers_the_current_models(shipped):
    missing = [model for model in REQUIRED if model not in shipped]
    assert missing == []
    assert shipped.price_of("gpt-4o") == ModelPrice(input=2.5, cached_input=1.25, output=10.0)
    assert shipped.price_of("gpt-4o-mini") == ModelPrice(input=0.15, cached_input=0.075, output=0.6)
    assert shipped.price_of("whisper-1") == ModelPrice(per_minute=0.006)
    assert shipped.price_of("gpt-4o-transcribe") == ModelPrice(input=2.5, output=10.0, audio_input=6.0)
    assert shipped.price_of("text-embedding-3-small") == ModelPrice(input=0.02, output=0.0)


def test_the_shipped_file_says_where_its_prices_come_from_and_when_they_were_checked():
    lines = (ROOT / "openai_proxy" / "data" / "prices.toml").read_text().splitlines()
    assert lines[0].startswith("# Standard-tier OpenAI prices") and "OpenAI pricing page, as of " in lines[0]
    assert lines[1].startswith("# checked 2026-12-07 against OpenAI's model pages")


@pytest.mark.parametrize(
    ("model", "tier", "price"),
    [
        # Flex is billed at Batch API rates: half the standard prices.
        ("gpt-5", "flex", ModelPrice(input=0.625, cached_input=0.0625, output=5.0)),
        ("gpt-5-2025-08-07", "flex", ModelPrice(input=0.625, cached_input=0.0625, output=5.0)),
        ("gpt-5-mini", "flex", ModelPrice(input=0.125, cached_input=0.0125, output=1.0)),
        ("gpt-5-nano", "flex", ModelPrice(input=0.025, cached_input=0.0025, output=0.2)),
        ("o3", "flex", ModelPrice(input=1.0, cached_input=0.25, output=4.0)),
        ("o4-mini", "flex", ModelPrice(input=0.55, cached_input=0.1375, output=2.2)),
        # Priority, OpenAI's own list.
        ("gpt-5", "priority", ModelPrice(input=2.5, cached_input=0.25, output=20.0)),
        ("gpt-4o-mini", "priority", ModelPrice(input=0.25, cached_input=0.125, output=1.0)),
        ("gpt-4o-2024-11-20", "priority", ModelPrice(input=4.25, cached_input=2.125, output=17.0)),
        ("gpt-4o-2024-05-13", "priority", ModelPrice(input=8.75, output=26.25)),
        ("o3", "priority", ModelPrice(input=3.5, cached_input=0.875, output=14.0)),
        # Tiers that are not priced apart: the row's own prices.
        ("gpt-5", "default", ModelPrice(input=1.25, cached_input=0.125, output=10.0)),
        ("gpt-5", "scale", ModelPrice(input=1.25, cached_input=0.125, output=10.0)),
        ("gpt-5", None, ModelPrice(input=1.25, cached_input=0.125, output=10.0)),
        ("gpt-4o-mini", "flex", ModelPrice(input=0.15, cached_input=0.075, output=0.6)),
        ("o4-mini", "priority", ModelPrice(input=1.1, cached_input=0.275, output=4.4)),
        # Free models are priced (at 0), so a budget does not refuse them.
        ("omni-moderation-2024-09-26", None, ModelPrice(input=0.0, output=0.0)),
    ],
)
def test_the_shipped_table_prices_the_tiers_openai_prices_apart(shipped, model, tier, price):
    assert shipped.price_of(model, tier) == price


def test_a_call_is_priced_by_the_tier_it_ran_on(shipped):
    usage = {"prompt_tokens": 1000, "cached_tokens": 200, "completion_tokens": 500}
    # gpt-5: 800 x 1.25 + 200 x 0.125 + 500 x 10 = 6025 / 1e6; flex half of it; priority twice.
    assert shipped.cost_usd("gpt-5", usage) == 0.006025
    assert shipped.cost_usd("gpt-5", usage, "flex") == 0.0030125
    assert shipped.cost_usd("gpt-5", usage, "priority") == 0.01205


def test_estimates_are_priced_like_usage(shipped, tmp_path):
    from openai_proxy.usage import Estimate

    # gpt-4o-mini: 100 in x 0.15 + 1000 out x 0.60 = 615 / 1e6; on priority 100 x 0.25 + 1000 x 1.
    assert shipped.estimate_usd("gpt-4o-mini", Estimate(100, 1000)) == 0.000615
    assert shipped.estimate_usd("gpt-4o-mini", Estimate(100, 1000, service_tier="priority")) == 0.001025
    # Priced by the minute: the upload's duration; unknown duration: nothing to reserve, but priced.
    assert shipped.estimate_usd("whisper-1", Estimate(0, 4096, audio_seconds=90)) == 0.009
    assert shipped.estimate_usd("whisper-1", Estimate(0, 4096)) == 0.0
    assert shipped.estimate_usd("text-embedding-3-small", Estimate(1000, 4096)) == 0.00002
    assert shipped.estimate_usd("my-local-llama", Estimate(100, 1000)) is None
    path = tmp_path / "p.toml"
    path.write_text("[default]\ninput = 1\noutput = 2\n")
    assert load_prices(str(path)).estimate_usd("my-local-llama", Estimate(100, 1000)) == 0.0021


@pytest.mark.parametrize(
    ("model", "row"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # a snapshot with a price of its own keeps it
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-0613", "gpt-3.5-turbo-0613"),
        ("o1-2024-12-17", "o1"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("gpt-4o-audio-preview-2024-12-17", "gpt-4o-audio-preview"),
        ("gpt-4o-audio-preview-2024-10-01", "gpt-4o-audio-preview-2024-10-01"),
        # Never a loose match: a different model, a suffix that is not a date, a date that is not one.
        ("gpt-4o-mini-tts", None),
        ("gpt-4o-custom", None),
        ("gpt-4o-2024-13-01", None),
        ("gpt-4o-1340", None),
        ("gpt-4o-20240806", None),
        ("gpt-4o-2024-08-06-extra", None),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", None),
        ("GPT-4O", None),
        ("", None),
        (None, None),
    ],
)
def test_snapshots_match_their_base_model_and_nothing_looser(shipped, model, row):
    assert shipped.row_name(model) == row


PRICE = ModelPrice(input=2.0, cached_input=0.5, output=8.0, audio_input=40.0, audio_output=80.0)


@pytest.mark.parametrize(
    ("usage", "usd"),
    [
        ({"prompt_tokens": 1_000_000}, 2.0),
        ({"completion_tokens": 1_000_000}, 8.0),
        # Cached tokens are inside prompt tokens: priced once, at the cached rate.
        ({"prompt_tokens": 1_000_000, "cached_tokens": 1_000_000}, 0.5),
        ({"prompt_tokens": 1_000_000, "cached_tokens": 250_000}, 1.5 + 0.125),
        # Reasoning tokens are inside completion tokens: never priced a second time.
        ({"completion_tokens": 1_000_000, "reasoning_tokens": 900_000}, 8.0),
        ({"prompt_tokens": 1_000_000, "input_audio_tokens": 500_000}, 1.0 + 20.0),
        ({"completion_tokens": 1_000_000, "output_audio_tokens": 1_000_000}, 80.0),
        ({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, 0.0),
        # Cached beyond the prompt (nonsense from upstream) cannot make a negative input.
        ({"prompt_tokens": 10, "cached_tokens": 20}, 10 * 0.5 / 1e6),
    ],
)
def test_cost_of_each_kind_of_token(usage, usd):
    assert cost_of(PRICE, usage) == pytest.approx(usd, rel=1e-12)


@pytest.mark.parametrize(
    ("price", "usage"),
    [
        (ModelPrice(input=1.0, output=1.0), {"prompt_tokens": 10, "input_audio_tokens": 5}),
        (ModelPrice(input=1.0, output=1.0), {"completion_tokens": 10, "output_audio_tokens": 5}),
        (ModelPrice(input=1.0, output=1.0), {"seconds": 30}),
        (ModelPrice(per_minute=0.006), {"prompt_tokens": 10}),
        (PRICE, {"total_tokens": 10}),
        (PRICE, {}),
    ],
)
def test_usage_without_a_price_for_it_is_unpriced_never_zero(price, usage):
    assert cost_of(price, usage) is None


def test_cached_input_defaults_to_input():
    assert cost_of(ModelPrice(input=3.0, output=1.0), {"prompt_tokens": 10, "cached_tokens": 4}) == 30 / 1e6


def test_costs_are_rounded_without_float_noise(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[models."m"]\ninput = 0.1\ncached_input = 0.2\noutput = 0.3\n')
    table = load_prices(str(path))
    # 0.1 + 0.2 is 0.30000000000000004 in floats.
    assert table.cost_usd("m", {"prompt_tokens": 2_000_000, "cached_tokens": 1_000_000}) == 0.3
    assert table.cost_usd("m", {"prompt_tokens": 1}) == 1e-07
    assert table.cost_usd("m", None) is None
    assert table.cost_usd("unknown", {"prompt_tokens": 1}) is None


def test_per_minute_prices(shipped):
    assert shipped.cost_usd("whisper-1", {"seconds": 90}) == 0.009
    assert shipped.cost_usd("whisper-1", {"seconds": 1.5}) == 0.00015


def test_the_operators_rows_replace_and_extend(tmp_path, shipped):
    path = tmp_path / "p.toml"
    path.write_text(
        '# our negotiated prices\n[models."gpt-4o"]\ninput = 2\noutput = 8\n\n'
        "[models.my-model]\ninput = 1\ncached_input = 0\noutput = 0\n\n"
        "[models.'whisper-2']\nper_minute = 0.01\n"
    )
    table = load_prices(str(path))
    # The operator's row wins as a whole: no cached price given, so none is taken from the shipped row.
    assert table.price_of("gpt-4o") == ModelPrice(input=2.0, output=8.0)
    assert table.price_of("gpt-4o-2024-08-06") == ModelPrice(input=2.0, output=8.0)
    assert table.price_of("my-model") == ModelPrice(input=1.0, cached_input=0.0, output=0.0)
    assert table.price_of("whisper-2") == ModelPrice(per_minute=0.01)
    assert table.price_of("gpt-4o-mini") == shipped.price_of("gpt-4o-mini")
    assert len(table) == len(shipped) + 2


def test_the_operators_row_replaces_the_shipped_tiers_and_adds_its_own(tmp_path, shipped):
    path = tmp_path / "p.toml"
    path.write_text(
        '[models."gpt-5"]\ninput = 1\noutput = 8\n\n'
        '[models."gpt-4o-mini"]\ninput = 0.1\noutput = 0.5\nflex = { input = 0.05, output = 0.25 }\n'
    )
    table = load_prices(str(path))
    # Its own row has no tiers: flex is priced at the row's prices, not the shipped flex.
    assert table.price_of("gpt-5", "flex") == ModelPrice(input=1.0, output=8.0)
    assert table.tiers_of("gpt-5") == ()
    assert table.price_of("gpt-4o-mini", "flex") == ModelPrice(input=0.05, output=0.25)
    assert table.price_of("gpt-4o-mini", "priority") == ModelPrice(input=0.1, output=0.5)
    assert table.price_of("o3", "flex") == shipped.price_of("o3", "flex")


def test_a_default_price_prices_every_model_without_a_row(tmp_path, shipped):
    assert shipped.default is None and shipped.price_of("my-local-llama") is None
    path = tmp_path / "p.toml"
    path.write_text("[default]\ninput = 5\ncached_input = 1\noutput = 15\n")
    table = load_prices(str(path))
    assert table.price_of("my-local-llama") == ModelPrice(input=5.0, cached_input=1.0, output=15.0)
    assert table.price_of("my-local-llama", "flex") == ModelPrice(input=5.0, cached_input=1.0, output=15.0)
    assert table.price_of("gpt-4o-mini") == shipped.price_of("gpt-4o-mini")  # rows keep their own
    assert table.cost_usd("gpt-9", {"prompt_tokens": 1000, "completion_tokens": 100}) == 0.0065
    assert len(table) == len(shipped)


def test_an_empty_operator_file_changes_nothing(tmp_path, shipped):
    path = tmp_path / "p.toml"
    path.write_text("# nothing yet\n")
    assert len(load_prices(str(path))) == len(shipped)


def test_the_setting_is_kept_and_shown(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("")
    config = build_config({"OPENAI_PROXY_PRICES_FILE": str(path)})
    assert config.prices_file == str(path)
    assert config.public_view()["prices_file"] == str(path)
    assert build_config({"OPENAI_PROXY_PRICES_FILE": "  "}).prices_file is None


FIELD_LIST = "(known: input, cached_input, output, audio_input, audio_output, per_minute)"
BAD_FILES = [
    ('[models."gpt-4o"]\ninput = 1\noutput = \n', "line 3, column 10: not valid TOML (Invalid value)"),
    ('[models."gpt-4o"]\ninput = 1\noutput = 2\n[models."x"',
     "line 4: not valid TOML (Expected ']' at the end of a table declaration)"),
    ('[models."gpt-4o"]\ninput = 1\noutput = 2\ninput = 3\n', "line 4, column 10: not valid TOML (Cannot overwrite a value)"),
    ('[models."gpt-4o"]\ninput = 1\ncached_input = 0.5\noutptu = 2\n',
     f'line 4: [models."gpt-4o"] has an unknown field \'outptu\' {FIELD_LIST}'),
    ('[models]\n"gpt-4o" = { input = 1, outptu = 2 }\n',
     f'line 2: [models."gpt-4o"] has an unknown field \'outptu\' {FIELD_LIST}'),
    ('# ours\n\n[models."gpt-4o"]\ninput = -1\noutput = 2\n',
     'line 4: [models."gpt-4o"] input must be a finite number >= 0 (USD per million tokens), not -1'),
    ('[models."a"]\ninput = 1\noutput = 2\n\n[models."gpt-4o"]\ninput = "2.50"\noutput = 10\n',
     'line 6: [models."gpt-4o"] input must be a number (USD per million tokens), not "2.50"'),
    ('[models."gpt-4o"]\ninput = true\noutput = 2\n',
     'line 2: [models."gpt-4o"] input must be a number (USD per million tokens), not true'),
    ('[models."gpt-4o"]\ninput = 1\noutput = [2]\n',
     'line 3: [models."gpt-4o"] output must be a number (USD per million tokens), not [2]'),
    ('[models."gpt-4o"]\ninput = nan\noutput = 2\n',
     'line 2: [models."gpt-4o"] input must be a finite number >= 0 (USD per million tokens), not nan'),
    ('[models."gpt-4o"]\ninput = 1\noutput = inf\n',
     'line 3: [models."gpt-4o"] output must be a finite number >= 0 (USD per million tokens), not inf'),
    ('[models."w"]\nper_minute = -0.006\n',
     'line 2: [models."w"] per_minute must be a finite number >= 0 (USD per minute of audio), not -0.006'),
    ('[models."gpt-4o"]\ninput = 1\n', 'line 1: [models."gpt-4o"] is missing output (USD per million output tokens)'),
    ('[models."gpt-4o"]\noutput = 1\n', 'line 1: [models."gpt-4o"] is missing input (USD per million input tokens)'),
    ('[models."w"]\nper_minute = 0.01\ninput = 1\n', 'line 1: [models."w"] is missing output (USD per million output tokens)'),
    ('[models."a"]\ninput = 1\noutput = 1\n[models.""]\ninput = 1\noutput = 2\n',
     'line 4: [models.""] has an empty model name'),
    ('[models."  "]\ninput = 1\noutput = 2\n', 'line 1: [models."  "] has an empty model name'),
    ('[models." gpt-4o"]\ninput = 1\noutput = 2\n', 'line 1: [models." gpt-4o"] has spaces around the model name'),
    ('[models.gpt-4.1]\ninput = 1\noutput = 2\n',
     "line 1: [models.\"gpt-4\"] has a table '1' inside: quote names with dots, like [models.\"gpt-4.1\"]; "
     "the tiers priced apart are flex, priority"),
    ('[models]\n"gpt-4o" = 5\n', 'line 2: [models."gpt-4o"] must be a table of prices (input, cached_input, output, ...)'),
    ('currency = "USD"\n[models."gpt-4o"]\ninput = 1\noutput = 2\n',
     "line 1: unknown field 'currency': a price file holds [models.\"<model>\"] tables and [default]"),
    ('[models."gpt-4o"]\ninput = 1\noutput = 2\n\n[model."gpt-4o-mini"]\ninput = 1\n',
     "line 5: unknown field 'model': a price file holds [models.\"<model>\"] tables and [default]"),
    ("models = 3\n", 'line 1: models must be tables like [models."gpt-4o"]'),
    ('[models."gpt-5"]\ninput = 1\noutput = 2\n\n[models."gpt-5".flex]\ninput = 0.5\noutptu = 1\n',
     f'line 7: [models."gpt-5".flex] has an unknown field \'outptu\' {FIELD_LIST}'),
    ('[models."gpt-5"]\ninput = 1\noutput = 2\n\n[models."gpt-5".priority]\ninput = 2\n',
     'line 5: [models."gpt-5".priority] is missing output (USD per million output tokens)'),
    ('[models."gpt-5"]\ninput = 1\noutput = 2\nflex = { input = -1, output = 1 }\n',
     'line 4: [models."gpt-5".flex] input must be a finite number >= 0 (USD per million tokens), not -1'),
    ('[models."gpt-5"]\ninput = 1\noutput = 2\n\n[models."gpt-5".batch]\ninput = 0.5\noutput = 1\n',
     "line 5: [models.\"gpt-5\"] has a table 'batch' inside: quote names with dots, like "
     "[models.\"gpt-4.1\"]; the tiers priced apart are flex, priority"),
    ('[models."gpt-5"]\ninput = 1\noutput = 2\n[models."gpt-5".flex.priority]\ninput = 1\noutput = 1\n',
     "line 4: [models.\"gpt-5\".flex] has a table 'priority' inside: quote names with dots, like "
     "[models.\"gpt-4.1\"]"),
    ("[default]\ninput = 1\n", "line 1: [default] is missing output (USD per million output tokens)"),
    ('# fallback\n[default]\ninput = "1"\noutput = 2\n',
     'line 3: [default] input must be a number (USD per million tokens), not "1"'),
    ("default = 3\n", "line 1: [default] must be a table of prices (input, cached_input, output, ...)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "says"), BAD_FILES)
def test_a_bad_price_file_stops_the_server_with_file_line_and_reason(make_app, tmp_path, text, says):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    expected = f"OPENAI_PROXY_PRICES_FILE={str(path)!r}, {says}"
    with pytest.raises(ConfigError) as exc:
        load_prices(str(path))
    assert str(exc.value) == expected
    with pytest.raises(ConfigError) as exc:
        make_app(OPENAI_PROXY_PRICES_FILE=str(path))
    assert str(exc.value) == expected
    # A config made some other way is checked again when the app is built.
    config = dataclasses.replace(build_config({}), prices_file=str(path))
    with pytest.raises(ConfigError) as exc:
        create_app(config)
    assert str(exc.value) == expected


def test_an_unreadable_price_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load_prices(str(missing))
    assert (
        str(exc.value)
        == f"OPENAI_PROXY_PRICES_FILE={str(missing)!r}: cannot be read (No such file or directory)"
    )
    with pytest.raises(ConfigError) as exc:
        load_prices(str(tmp_path))
    assert str(exc.value) == f"OPENAI_PROXY_PRICES_FILE={str(tmp_path)!r}: cannot be read (Is a directory)"
    latin = tmp_path / "latin1.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load_prices(str(latin))
    assert str(exc.value) == (
        f"OPENAI_PROXY_PRICES_FILE={str(latin)!r}: is not UTF-8 text (invalid continuation byte at byte 5)"
    )


@pytest.mark.gunicorn
def test_gunicorn_refuses_to_start_with_a_bad_price_file(fake, tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text('[models."gpt-4o"]\ninput = 1\noutptu = 2\n')
    env = {**base_env(fake, OPENAI_PROXY_PRICES_FILE=str(path)), "PATH": os.environ.get("PATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app.wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        f"openai-proxy cannot start: OPENAI_PROXY_PRICES_FILE={str(path)!r}, line 3: "
        f"[models.\"gpt-4o\"] has an unknown field 'outptu' {FIELD_LIST}"
    ) in done.stderr
