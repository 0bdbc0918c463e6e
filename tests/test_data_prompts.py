"""The prompt formats are defined once (comp.data.prompts) and every reader takes them from there."""
from __future__ import annotations

import pytest

from comp.data.prompts import (DEFAULT_PROMPT_FORMAT, DEFAULT_SYSTEM_PROMPT, PROMPT_FORMATS,
                               adds_default_system, check_prompt_format, prompt_messages,
                               system_message, user_content, with_default_system)
from comp.tokens import CHAT_TEMPLATE_PATH

USER = {"role": "user", "content": [{"type": "text", "text": "hi"}]}


def test_the_chat_templates_default_system_turn_is_the_formats():
    template = CHAT_TEMPLATE_PATH.read_text()
    assert f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>" in template


@pytest.mark.parametrize("use", [check_prompt_format, adds_default_system,
                                 lambda f: prompt_messages([USER], f), lambda f: user_content("q", 0, f),
                                 lambda f: with_default_system([USER], f)])
def test_an_unknown_format_is_refused_with_the_choices(use):
    with pytest.raises(ValueError, match=r"prompt_format must be one of \('reference', 'inplace'\), got 'raw'"):
        use("raw")


def test_the_default_system_turn_follows_the_format():
    assert DEFAULT_PROMPT_FORMAT in PROMPT_FORMATS
    assert with_default_system([USER], "reference") == [system_message(), USER]
    assert with_default_system([USER], "inplace") == [USER]
    own = [system_message("be brief"), USER]
    assert with_default_system(own, "reference") == own
    assert prompt_messages([USER], "reference")[0] == system_message()
    assert prompt_messages([USER], "inplace") == [USER]


def test_commands_offer_the_formats_defined_here():
    from comp.data.show import build_parser as show_parser
    from comp.eval.chat import build_parser as chat_parser
    from comp.train.args import build_parser as train_parser

    for parser in (show_parser(), chat_parser(), train_parser()):
        action = next(a for a in parser._actions if a.dest == "prompt_format")
        assert tuple(action.choices) == PROMPT_FORMATS and action.default == DEFAULT_PROMPT_FORMAT
