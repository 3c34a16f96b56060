"""Prompt formats (scratchlm.chat): every built-in format renders as transformers renders the
matching Jinja chat template; training segments join to the same text and mask all but the
answers; one resolution order; clear errors for bad input."""

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from scratchlm.chat import (  # noqa: E402
    FORMATS,
    PROMPT_FORMAT_FILE,
    TEMPLATES,
    PromptFormatError,
    chat_stops,
    format_prompt,
    read_prompt_format,
    render_chat,
    render_example,
    render_segments,
    resolve_template,
    write_prompt_format,
)
from scratchlm.errors import ScratchLMError  # noqa: E402
from scratchlm.finetune.instruct_data import tokenize_example  # noqa: E402
from scratchlm.tokenizer import CharTokenizer  # noqa: E402

# The real templates of the families, as their tokenizer_config.json files publish them.
# Qwen3 (Qwen/Qwen3-8B): ChatML; think blocks on the answers after the last user query.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# OLMo 2 Instruct (allenai/OLMo-2-1124-7B-Instruct; Tulu 3's layout), bos = eos = <|endoftext|>.
OLMO2 = (r"{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + "
         r"message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
         r"'\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + "
         r"message['content'] + eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + "
         r"eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}"
         r"{% endif %}{% endfor %}")
# Jinja chat templates written as the model families publish them (text content only, no
# tools), rendered by transformers' apply_chat_template: the reference for the built-ins.
NL = "{{ '\\n' }}"
JINJA = {
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Qwen 2.5: ChatML with a default system message.
    "qwen": ("{%- if messages[0]['role'] == 'system' %}"
             "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
             "{%- else %}"
             "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
             "{%- endif %}"
             "{%- for message in messages %}"
             "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
             "(message.role == 'assistant') %}"
             "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
             "{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    # Gemma 3 (google/gemma-3-1b-it's tokenizer_config.json, as published): no system turn
    # (its text opens the first user message); the assistant is "model"; contents trimmed.
    "gemma": GEMMA3,
    "qwen3": QWEN3,
    "olmo2": OLMO2,
    "plain": ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}" + NL + "{% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}"),
    # Alpaca: the last user message is the instruction; a transcript is one exchange.
    "alpaca": ("{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
               "{{ 'Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\\n\\n### Instruction:\\n' + users[-1]['content'] + '\\n\\n### Response:\\n' }}"
               "{% if not add_generation_prompt and messages[-1]['role'] == 'assistant' %}"
               "{{ messages[-1]['content'] + eos_token }}{% endif %}"),
}
SPECIALS = {  # (bos, eos, other special tokens) of a tokenizer of each format
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "chatml": ("<|im_start|>", "<|im_end|>", []),
    "qwen": ("<|im_start|>", "<|im_end|>", []),
    "gemma": ("<bos>", "<end_of_turn>", ["<start_of_turn>"]),
    "qwen3": ("<|im_start|>", "<|im_end|>", ["<think>", "</think>"]),
    "olmo2": ("<|endoftext|>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>"]),
    "plain": ("<|endoftext|>", "<|endoftext|>", []),
    "alpaca": ("<|endoftext|>", "<|endoftext|>", []),
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello.\nHow can I help?"}, {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."}]
ONE_EXCHANGE = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]
# Answers with reasoning (in the content, and as reasoning_content), and text with spaces
# and newlines around it (which Llama 3's and Gemma's templates trim).
THINKING = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello."},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because.", "reasoning_content": "\nI ask.\n"}]
PADDED = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "  Hi there \n"},
          {"role": "assistant", "content": "\nHello. "}]
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?#'-\n"


def hf_tokenizer(name):
    from tokenizers import Tokenizer, models

    bos, eos, _ = SPECIALS[name]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=JINJA[name],
                                                bos_token=bos, eos_token=eos)


def char_tokenizer(name):
    bos, eos, others = SPECIALS[name]
    return CharTokenizer.train(LETTERS, special_tokens=dict.fromkeys(["<|endoftext|>", bos, eos, *others]))


def conversations(name):
    """(messages, add_generation_prompt) pairs each format can hold: multi-turn with a system
    message for the chat formats, one exchange for alpaca."""
    if name == "alpaca":
        return [(CHAT[:4], True), (ONE_EXCHANGE, False), (ONE_EXCHANGE[:1], True)]
    return [(CHAT[:4], True), (CHAT[:4], False), (CHAT, False), (CHAT[1:4], True), (CHAT[1:], False),
            (THINKING, False), (THINKING[:3], True), (THINKING[:2], False), (PADDED, False), (PADDED[:2], True)]


def test_table_covers_the_formats():
    assert set(TEMPLATES) == set(JINJA) and TEMPLATES[:3] == ("llama3", "qwen3", "chatml")
    for fmt in FORMATS.values():
        assert set(fmt.header) == {"system", "user", "assistant", "tool"}
        markup = "".join(fmt.header.values()) + fmt.begin + fmt.end_of_turn + ("<think>" if fmt.thinking else "")
        assert all(t in markup for t in fmt.signature)


@pytest.mark.parametrize("name", TEMPLATES)
def test_builtin_formats_render_as_transformers_renders_their_jinja(name):
    hf = hf_tokenizer(name)
    for messages, add in conversations(name):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert render_chat(messages, name, None, add_generation_prompt=add) == expected, (messages, add)
        # The segments join to that text: inference and training see one layout.
        assert "".join(s.text for s in render_segments(messages, name, add)) == expected

        class Tok:  # a tokenizer carrying the Jinja template, as loaded from tokenizer_config.json
            chat_template, bos_token, eos_token, special_tokens, eot_id = JINJA[name], hf.bos_token, hf.eos_token, {}, None

        assert render_chat(messages, None, Tok(), add_generation_prompt=add) == expected  # our Jinja sandbox


@pytest.mark.parametrize("name", TEMPLATES)
def test_training_masks_keep_only_the_answers_and_their_end_of_turn(name):
    tok = char_tokenizer(name)
    messages = ONE_EXCHANGE if name == "alpaca" else CHAT
    segments = render_example({"messages": messages}, name)
    text = "".join(s.text for s in segments)
    assert text == hf_tokenizer(name).apply_chat_template(messages, tokenize=False)
    example = tokenize_example(segments, tok)
    assert example.ids == tok.encode(text)  # segment by segment == the whole text at once
    end = FORMATS[name].end_of_turn
    # Qwen3's last answer opens with its (empty) think block, which the model learns to write.
    think = "<think>\n\n</think>\n\n" if FORMATS[name].thinking else ""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    answers[-1] = think + answers[-1]
    learned = tok.decode([i for i, keep in zip(example.ids, example.trainable) if keep])
    assert learned == "".join(a + end for a in answers)
    # Every answer follows exactly the prompt the model is given at inference.
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render_chat(messages[:i], name, None)
            answer = (think if i == len(messages) - 1 else "") + m["content"]
            assert text.startswith(prompt) and text[len(prompt):].lstrip(" ").startswith(answer + end)
    # train_on_prompt: every token is a target.
    assert all(tokenize_example(segments, tok, train_on_prompt=True).trainable)


def test_alpaca_records_and_format_prompt():
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    segments = render_example(record, "alpaca")
    assert [s.text for s in segments if s.trainable] == ["5", "<|endoftext|>"]
    assert segments[0].text.endswith("### Input:\n2 and 3\n\n### Response:\n") and not segments[0].special
    assert format_prompt("alpaca", record) == segments[0].text == format_prompt("alpaca", "Add.", "2 and 3")
    # A chat format holds the record as a user message (the input after a blank line) and its answer.
    assert render_example(record, "chatml") == render_segments(
        [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}], "chatml")
    assert format_prompt("llama3", "Add.", "2 and 3") == render_chat(
        [{"role": "user", "content": "Add.\n\n2 and 3"}], "llama3", None)
    with pytest.raises(PromptFormatError, match="one instruction and one answer"):
        render_example({"messages": CHAT}, "alpaca")
    with pytest.raises(PromptFormatError, match="input"):
        format_prompt("chatml", CHAT[:2], input="x")


def test_qwen_keeps_a_given_system_message_and_gemma_refuses_a_late_one():
    assert render_chat(CHAT[:2], "qwen", None) == render_chat(CHAT[:2], "chatml", None)
    assert "You are Qwen" in render_chat(CHAT[1:2], "qwen", None)
    with pytest.raises(PromptFormatError, match="no system turn"):
        render_chat(CHAT[1:2] + CHAT[:1], "gemma", None)
    with pytest.raises(PromptFormatError, match="no system turn"):
        render_chat(CHAT[:1], "gemma", None)


def test_stops_are_ids_for_special_tokens_and_text_otherwise():
    for name in ("llama3", "chatml", "gemma"):
        tok = char_tokenizer(name)
        end = FORMATS[name].end_of_turn
        assert chat_stops(name, tok) == ([], [tok.special_tokens[end], tok.eot_id])
        assert chat_stops(name, None) == ([end], [])
    tok = char_tokenizer("plain")
    assert chat_stops("plain", tok) == (["\nUser:", "\nSystem:"], [tok.eot_id])
    assert chat_stops("alpaca", tok) == ([], [tok.eot_id])

    class JinjaTok:  # an unknown Jinja template: whichever known end-of-turn tokens it has
        chat_template, eot_id = "{{ messages[0]['content'] }}", 2
        special_tokens = {"<|im_end|>": 7, "</s>": 2, "<|custom|>": 9}

    assert chat_stops(None, JinjaTok()) == ([], [7, 2])


def test_resolution_order(tmp_path):
    jinja = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}{% endfor %}"

    class Tok:
        chat_template, eot_id = jinja, 0
        special_tokens = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}

    tok = Tok()
    tuned, bare = tmp_path / "tuned", tmp_path / "bare"
    tuned.mkdir(), bare.mkdir()
    write_prompt_format(tuned, "alpaca")
    # 1. the one asked for, 2. the model directory's record, 3. the tokenizer's Jinja template
    assert resolve_template("gemma", tok, tuned) == "gemma"
    assert resolve_template(jinja + " ", tok, tuned) == jinja + " "
    assert resolve_template(None, tok, tuned) == "alpaca"
    assert resolve_template(None, tok, bare) == jinja
    assert resolve_template(None, tok, "some/hub-id") == jinja  # not a directory: no record to read
    # 4. detected: training skips the Jinja template, and reads its markers (Llama 3 headers)
    assert resolve_template(None, tok, bare, training=True) == "llama3"
    tok.chat_template = None
    assert resolve_template(None, tok) == resolve_template(None, tok, training=True) == "chatml"
    # 5. the fallbacks: plain for chat; alpaca for training, chatml for multi-turn data
    tok.special_tokens = {"<|endoftext|>": 0}
    assert resolve_template(None, tok) == "plain"
    assert resolve_template(None, tok, training=True) == "alpaca"
    assert resolve_template(None, tok, training=True, records=[{"messages": ONE_EXCHANGE}]) == "alpaca"
    assert resolve_template(None, tok, training=True, records=[{"messages": CHAT}]) == "chatml"
    with pytest.raises(PromptFormatError, match="built-in"):
        resolve_template(jinja, tok, training=True)
    with pytest.raises(PromptFormatError, match="unknown chat template 'vicuna'"):
        resolve_template("vicuna", tok)


def test_prompt_format_file_round_trip_and_errors(tmp_path):
    for name in TEMPLATES:
        write_prompt_format(tmp_path, name)
        assert json.loads((tmp_path / PROMPT_FORMAT_FILE).read_text()) == {
            "template": name, "end_of_turn": FORMATS[name].end_of_turn}
        assert read_prompt_format(tmp_path) == name
    assert [p.name for p in tmp_path.iterdir()] == [PROMPT_FORMAT_FILE]  # no temporary file left
    assert read_prompt_format(tmp_path / "elsewhere") is None
    for bad, message in [("{not json", "not a valid prompt format"), ("[1]", "JSON object"),
                         ('{"template": "vicuna"}', "unknown template 'vicuna'"), ("{}", "unknown template None")]:
        (tmp_path / PROMPT_FORMAT_FILE).write_text(bad)
        with pytest.raises(PromptFormatError, match=message):
            read_prompt_format(tmp_path)
        with pytest.raises(PromptFormatError):
            resolve_template(None, None, tmp_path)
    with pytest.raises(PromptFormatError):
        write_prompt_format(tmp_path, "vicuna")


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"), ("Hi", "non-empty list"), ([{"role": "user"}], "string 'content'"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"), (["Hi"], "string 'content'")])
def test_bad_conversations_are_user_errors(messages, message):
    for template in ("chatml", "alpaca", "{{ messages }}"):
        with pytest.raises(PromptFormatError, match=message):
            render_chat(messages, template, None)
    assert issubclass(PromptFormatError, ScratchLMError)


def test_jinja_template_errors_are_user_errors():
    with pytest.raises(PromptFormatError, match="chat template: no system"):
        render_chat(CHAT, "{{ raise_exception('no system') }}", None)
    with pytest.raises(PromptFormatError, match="does not parse"):
        render_chat(CHAT, "{% for %}", None)
    with pytest.raises(PromptFormatError, match="failed"):
        render_chat(CHAT, "{{ messages[0].content.nope.deeper }}", None)


def test_malformed_prompt_format_file_is_one_line_from_the_cli(tmp_path, capsys):
    import torch

    from scratchlm import ModelConfig, Transformer
    from scratchlm.checkpoint import save_model
    from scratchlm.cli import main

    tok = char_tokenizer("chatml")
    torch.manual_seed(0)
    save_model(tmp_path, Transformer(ModelConfig.preset("gpt-tiny", vocab_size=tok.vocab_size)), tok)
    (tmp_path / PROMPT_FORMAT_FILE).write_text('{"template": "vicuna"}')
    for args in (["generate", str(tmp_path), "Hi", "--max-new-tokens", "2"], ["chat", str(tmp_path)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("scratchlm: error: ") and PROMPT_FORMAT_FILE in err and len(err.splitlines()) == 1
