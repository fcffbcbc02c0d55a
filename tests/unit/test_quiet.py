# toolkit/quiet.py silences only the listed library messages: other messages of the same loggers and modules pass.
import logging
import warnings

import pytest

from toolkit.quiet import KNOWN_LOG_MESSAGES, KNOWN_WARNINGS, quiet_known_messages


@pytest.fixture
def quiet():
    """quiet_known_messages() for one test: the loggers' filters and the warning filters are put back after."""
    loggers = [logging.getLogger(name) for name in {known.logger for known in KNOWN_LOG_MESSAGES}]
    filters_before = {logger.name: list(logger.filters) for logger in loggers}
    with warnings.catch_warnings():
        quiet_known_messages()
        quiet_known_messages()   # a second call adds nothing
        yield
    for logger in loggers:
        logger.filters[:] = filters_before[logger.name]


def test_listed_log_messages_are_dropped_and_the_rest_of_the_logger_passes(quiet, caplog):
    for known in KNOWN_LOG_MESSAGES:
        assert len(logging.getLogger(known.logger).filters) == 1, known.logger
        assert known.reason
        with caplog.at_level(logging.WARNING, logger=known.logger):
            logger = logging.getLogger(known.logger)
            logger.propagate, propagate = True, logger.propagate   # DeepSpeed's logger does not propagate
            try:
                logger.warning(known.starts_with + " and the rest of the message")
                logger.warning("some other warning of this library")
            finally:
                logger.propagate = propagate
        # (another test's handler may see a record twice: compare what arrived, not how often)
        arrived = {r.getMessage() for r in caplog.records if r.name == known.logger}
        assert arrived == {"some other warning of this library"}, known.logger
        caplog.clear()


def test_listed_warnings_are_ignored_only_from_their_module(quiet):
    import torch.distributed.c10d_logger as source

    for known in KNOWN_WARNINGS:
        assert known.reason
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_messages()   # after "always", as the filters' order matters
            # What torch emits, attributed to its module; then the same text from elsewhere, and another warning.
            text = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ..."
            exec("import warnings; warnings.warn(TEXT, CATEGORY)", {"__name__": source.__name__, "TEXT": text,
                                                                    "CATEGORY": known.category})
            warnings.warn(text, known.category)
            exec("import warnings; warnings.warn('another deprecation', CATEGORY)",
                 {"__name__": source.__name__, "CATEGORY": known.category})
        assert [str(w.message) for w in caught] == [text, "another deprecation"]
