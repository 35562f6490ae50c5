"""Tests for kiln.general_utils.setup_logging, using real files in tmp_path."""

import json
import logging
import logging.handlers
from pathlib import Path

import pytest
import yaml
from pythonjsonlogger.json import JsonFormatter

from kiln.general_utils import BASIC_LOG_FORMAT, setup_logging

REPO_CONFIG = Path(__file__).parents[1] / "conf" / "logging.yaml"
FILE_HANDLERS = {
    "debug_file_handler": "debug.log",
    "info_file_handler": "info.log",
    "warn_file_handler": "warn.log",
    "error_file_handler": "error.log",
}


@pytest.fixture(autouse=True)
def reset_logging():
    """Undo whatever setup_logging did to the root logger after each test."""
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    saved_level = root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        if handler not in saved_handlers:
            handler.close()
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def write_config(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def file_config(*filenames):
    """A small dictConfig with one RotatingFileHandler per filename."""
    handlers = {
        f"file_{index}": {
            "class": "logging.handlers.RotatingFileHandler",
            "level": "DEBUG",
            "filename": filename,
            "encoding": "utf8",
        }
        for index, filename in enumerate(filenames)
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": handlers,
        "root": {"level": "DEBUG", "handlers": list(handlers)},
    }


def root_file_handlers():
    return [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]


def flush_root_handlers():
    for handler in logging.getLogger().handlers:
        handler.flush()


def read_json_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fallback_warnings(caplog):
    return [
        record for record in caplog.records if record.name == "kiln.general_utils" and record.levelno == logging.WARNING
    ]


def test_repo_config_loads(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    setup_logging(REPO_CONFIG, log_dir=tmp_path / "logs")

    assert fallback_warnings(caplog) == []
    root = logging.getLogger()
    assert root.level == logging.INFO
    handlers = {handler.name: handler for handler in root.handlers}
    assert set(handlers) == {"console", *FILE_HANDLERS}
    assert type(handlers["console"]) is logging.StreamHandler
    assert handlers["console"].formatter._fmt == BASIC_LOG_FORMAT
    expected_levels = {
        "debug_file_handler": logging.DEBUG,
        "info_file_handler": logging.INFO,
        "warn_file_handler": logging.WARNING,
        "error_file_handler": logging.ERROR,
    }
    for name, level in expected_levels.items():
        handler = handlers[name]
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        assert handler.level == level
        assert isinstance(handler.formatter, JsonFormatter)
        assert handler.maxBytes == 10485760
        assert handler.backupCount == 20


def test_log_dir_moves_file_handlers_and_writes_json_lines(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    log_dir = tmp_path / "run" / "logs"

    setup_logging(REPO_CONFIG, log_dir=log_dir)

    file_handlers = root_file_handlers()
    assert sorted(Path(h.baseFilename).name for h in file_handlers) == sorted(FILE_HANDLERS.values())
    for handler in file_handlers:
        assert Path(handler.baseFilename).parent == log_dir.resolve()
    # The YAML's own ./logs directory is not created when log_dir is given.
    assert not (workdir / "logs").exists()

    test_logger = logging.getLogger("kiln.tests.general_utils")
    test_logger.info("an info record")
    test_logger.warning("a warning record")
    test_logger.error("an error record")
    flush_root_handlers()

    assert sorted(path.name for path in log_dir.iterdir()) == sorted(FILE_HANDLERS.values())
    records = {name: read_json_lines(log_dir / name) for name in FILE_HANDLERS.values()}
    for entries in records.values():
        for entry in entries:
            assert entry["name"] == "kiln.tests.general_utils"
            assert "asctime" in entry

    def pairs(name):
        return [(entry["levelname"], entry["message"]) for entry in records[name]]

    everything = [
        ("INFO", "an info record"),
        ("WARNING", "a warning record"),
        ("ERROR", "an error record"),
    ]
    assert pairs("debug.log") == everything
    assert pairs("info.log") == everything
    assert pairs("warn.log") == everything[1:]
    assert ("INFO", "an info record") not in pairs("warn.log")
    assert pairs("error.log") == everything[2:]


def test_missing_config_falls_back_with_warning(tmp_path, caplog):
    missing = tmp_path / "no_such_dir" / "logging.yaml"
    handlers_before = logging.getLogger().handlers[:]

    setup_logging(missing)

    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(missing) in message
    assert "FileNotFoundError" in message
    # basicConfig adds nothing when the root logger already has handlers.
    assert logging.getLogger().handlers == handlers_before
    assert not missing.parent.exists()


def test_fallback_uses_basic_config(tmp_path, capsys):
    # With no root handlers, basicConfig installs a stderr handler at
    # default_level, and the warning goes through it.
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    missing = tmp_path / "logging.yaml"

    setup_logging(missing, default_level=logging.DEBUG)

    assert root.level == logging.DEBUG
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert type(handler) is logging.StreamHandler
    assert handler.formatter._fmt == BASIC_LOG_FORMAT
    err = capsys.readouterr().err
    assert "kiln.general_utils - WARNING - " in err
    assert str(missing) in err


@pytest.mark.parametrize(
    ("content", "error_name"),
    [
        pytest.param("version: 1\nhandlers: [unclosed\n", "ParserError", id="yaml"),
        pytest.param("", "ValueError", id="empty"),
        pytest.param("- version\n- 1\n", "ValueError", id="not-a-mapping"),
        pytest.param(
            "version: 1\n"
            "disable_existing_loggers: false\n"
            "handlers:\n"
            "  broken:\n"
            "    class: logging.NoSuchHandler\n"
            "root:\n"
            "  handlers: [broken]\n",
            "ValueError",
            id="dictconfig-fails",
        ),
    ],
)
def test_bad_config_falls_back_with_warning(tmp_path, caplog, content, error_name):
    config_path = tmp_path / "logging.yaml"
    config_path.write_text(content, encoding="utf-8")

    setup_logging(config_path)

    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(config_path) in message
    assert error_name in message


def test_caller_config_file_is_not_modified(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_path = write_config(tmp_path / "logging.yaml", file_config("./logs/app.log", "./logs/other.log"))
    before = config_path.read_bytes()

    setup_logging(config_path, log_dir=tmp_path / "first")
    setup_logging(config_path, log_dir=tmp_path / "second")

    assert config_path.read_bytes() == before
    assert sorted(Path(h.baseFilename) for h in root_file_handlers()) == [
        (tmp_path / "second" / "app.log").resolve(),
        (tmp_path / "second" / "other.log").resolve(),
    ]
    assert (tmp_path / "first" / "app.log").exists()
    assert not (tmp_path / "logs").exists()


def test_missing_parent_dirs_are_created_without_log_dir(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    config_path = write_config(
        tmp_path / "logging.yaml",
        file_config("./logs/app.log", "nested/deeper/app.log", "flat.log"),
    )

    setup_logging(config_path)

    assert fallback_warnings(caplog) == []
    for relative in ("logs/app.log", "nested/deeper/app.log", "flat.log"):
        assert (tmp_path / relative).is_file()
    logging.getLogger("kiln.tests.general_utils").info("kept where the YAML says")
    flush_root_handlers()
    assert "kept where the YAML says" in (tmp_path / "logs" / "app.log").read_text(encoding="utf-8")
