"""What a downloaded checkpoint folder can do to us: nothing. Its chat template renders in jinja2's immutable sandbox
(and still renders exactly as transformers renders it), and its pickles are read with weights_only, so a file that
would run code when unpickled is refused before any of it runs. Each hostile file here is shown to be live: the
same file run the unsafe way does create its marker, so a test that passes is not passing on a dud."""
import json
import shutil

import jinja2
import pytest
import torch

from conftest import DEFAULT_CHECKPOINT, RunsCode, make_hf_llama
from tokenizer import load_tokenizer

ESCAPE = "{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}"


@pytest.fixture(scope="module")
def smollm2_tokenizer_files():
    folder = DEFAULT_CHECKPOINT.parent
    if not (folder / "tokenizer.json").exists():
        pytest.fail(f"{folder / 'tokenizer.json'} is missing: run ./scripts/prepare.sh first")
    return folder


def tokenizer_folder(tmp_path, source, template=None, in_jinja_file=False):
    """SmolLM2's tokenizer with the chat template replaced: in tokenizer_config.json or chat_template.jinja."""
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    if template is None:
        shutil.copy(source / "chat_template.jinja", folder / "chat_template.jinja")
    elif in_jinja_file:
        (folder / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("in_jinja_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_hostile_template_runs_nothing(smollm2_tokenizer_files, tmp_path, in_jinja_file):
    marker = tmp_path / "MARKER"
    template = ESCAPE.format(marker=marker)
    tok = load_tokenizer(tokenizer_folder(tmp_path, smollm2_tokenizer_files, template, in_jinja_file))
    with pytest.raises(ValueError, match="unsafe operation"):
        tok.apply_chat_template([dict(role="user", content="hi")])
    assert not marker.exists()
    # live: the same template in a plain jinja2 Environment (what tokenizer.py used before) runs the command
    jinja2.Environment().from_string(template).render(messages=[])
    assert marker.exists()


# Templates using what real hub templates use: raise_exception, tojson, loop controls, trim/lstrip of blocks,
# strftime_now (date only, so that both renders see the same value), bos/eos tokens.
TEMPLATES = {
    "tojson_and_raise": (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{{ bos_token }}{{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"),
    "blocks_and_loopcontrols": (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    [{{ loop.index }}] {{ m['content'] | trim }}\n"
        "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}>{% endif %}"),
    "strftime": "Today: {{ strftime_now('%Y-%m-%d') }}\n{% for m in messages %}{{ m.content }}\n{% endfor %}",
    "named_list": [dict(name="tool_use", template="T{{ messages | length }}"),  # transformers' multi-template form
                   dict(name="default", template="D{% for m in messages %}<{{ m.content }}>{% endfor %}")],
}
MESSAGES = [dict(role="system", content="Be brief."), dict(role="user", content="Héllo \"quoted\" 日本 🙂"),
            dict(role="assistant", content="  Hi.  "), dict(role="user", content="a\nb"),
            dict(role="assistant", content="c"), dict(role="user", content="d")]


@pytest.mark.parametrize("name", [None, *TEMPLATES])
def test_templates_render_as_transformers_does(smollm2_tokenizer_files, tmp_path, name):
    from transformers import AutoTokenizer
    folder = tokenizer_folder(tmp_path, smollm2_tokenizer_files, TEMPLATES.get(name))
    ours, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for messages in (MESSAGES, MESSAGES[1:2]):
        for generation_prompt in (True, False):
            assert ours.apply_chat_template(messages, generation_prompt) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_raise_exception_is_one_clear_error(smollm2_tokenizer_files, tmp_path):
    tok = load_tokenizer(tokenizer_folder(tmp_path, smollm2_tokenizer_files, TEMPLATES["tojson_and_raise"]))
    with pytest.raises(ValueError, match="chat template: unknown role tool"):
        tok.apply_chat_template([dict(role="tool", content="x")])


@pytest.mark.parametrize("template, message", [
    ("{{ 1 + 'a' }}", "chat template failed: TypeError"),
    ("{% for %}", "cannot be rendered"),
    ("{{ messages.__class__.__mro__ }}", "unsafe operation"),
    ("{{ messages.append(1) }}", "unsafe operation"),  # immutable: a template cannot change what it is given
])
def test_bad_templates_are_value_errors(smollm2_tokenizer_files, tmp_path, template, message):
    tok = load_tokenizer(tokenizer_folder(tmp_path, smollm2_tokenizer_files, template))
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template([dict(role="user", content="hi")])


def test_pickle_that_runs_code_is_refused_by_the_converter(tmp_path):
    from convert_hf_checkpoint import convert
    folder = make_hf_llama(tmp_path / "hf", num_hidden_layers=1)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot read weights from .*pytorch_model.bin"):
        convert(folder)
    assert not marker.exists() and not (folder / "model.pth").exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # live: the unsafe way runs it
    assert marker.exists()


def test_pickle_that_runs_code_is_refused_by_load_model(tmp_path):
    import generate
    folder = make_hf_llama(tmp_path / "hf", num_hidden_layers=1)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    marker = tmp_path / "MARKER"
    torch.save({"tok_embeddings.weight": RunsCode(marker)}, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="cannot read .*model.pth"):
        generate.load_model(tmp_path / "model.pth")
    assert not marker.exists()
    torch.load(tmp_path / "model.pth", weights_only=False)
    assert marker.exists()
