"""The per-engine, per-release request table (``rollout/server_api.py``): one test per branch, on
answers shaped as each SGLang release's ``http_server.py`` / ``io_struct.py`` writes them.

The same table runs against real servers in ``test_engine_contract.py`` (SGLang 0.5.23, vLLM, lcr serve).
"""

from __future__ import annotations

import asyncio

import pytest

from megatron_lcr.rollout.engine import GenerateRequest, SamplingParams, expand_samples
from megatron_lcr.rollout.server_api import (
    LCR_SERVE_ENGINE,
    SGLANG_NEWEST,
    NotFound,
    SGLangAPI,
    UnsupportedServerError,
    detect_server_api,
    parse_generate_response,
    parse_score_response,
    parse_version,
    sglang_api_from_server_info,
)

URL = "http://10.0.0.5:30000"


def _spec(seed: int | None = 1):
    return expand_samples([GenerateRequest(input_ids=[5, 6, 7], rid="r", sampling=SamplingParams(seed=seed))])[0]


def _api(version: str, **info) -> SGLangAPI:
    return sglang_api_from_server_info({"version": version, **info}, URL)


def test_parse_version():
    assert parse_version("0.5.23") == (0, 5, 23)
    assert parse_version("0.5.9rc1") == (0, 5, 9)
    assert parse_version("0.32.0+cpu") == (0, 32, 0)
    with pytest.raises(ValueError, match="cannot read a version"):
        parse_version("dev")


def test_releases_older_than_weight_versions_are_refused_naming_url_and_range():
    with pytest.raises(UnsupportedServerError) as err:
        _api("0.4.10")
    message = str(err.value)
    assert URL in message and "0.4.10" in message and "0.5.1 to 0.5.23" in message and "\n" not in message


def test_newer_than_tested_is_refused_unless_allowed():
    with pytest.raises(UnsupportedServerError, match="newer than the newest tested.*allow_untested_engine"):
        _api("0.6.0")
    api = sglang_api_from_server_info({"version": "0.6.0"}, URL, allow_newer=True)
    assert api.release == SGLANG_NEWEST and api.update_session  # spoken to as the newest tested release


def test_no_version_field_is_refused():
    with pytest.raises(UnsupportedServerError, match="no 'version' field"):
        sglang_api_from_server_info({"model_path": "m"}, URL)


@pytest.mark.parametrize("version, seed_sent", [("0.5.1", False), ("0.5.2", False), ("0.5.3", True), ("0.5.23", True)])
def test_sampling_seed_only_from_0_5_3(version, seed_sent):
    call = _api(version).generate_call(_spec(seed=7), "r-0")
    assert (call.method, call.path) == ("POST", "/generate")
    assert ("sampling_seed" in call.payload["sampling_params"]) is seed_sent
    if seed_sent:
        assert call.payload["sampling_params"]["sampling_seed"] == 7
    assert call.payload["input_ids"] == [5, 6, 7] and call.payload["logprob_start_len"] == -1


@pytest.mark.parametrize("version, path", [("0.5.1", "/get_model_info"), ("0.5.5", "/get_model_info"),
                                           ("0.5.6", "/model_info"), ("0.5.23", "/model_info")])
def test_weight_version_is_read_from_model_info(version, path):
    api = _api(version)
    assert api.model_info_call().path == path  # never /get_weight_version (404 from 0.5.8)
    info = api.parse_model_info({"model_path": "/m", "weight_version": 3, "model_type": "llama",
                                 "architectures": ["LlamaForCausalLM"]})
    assert (info.model_path, info.weight_version, info.model_type, info.architectures) == (
        "/m", "3", "llama", ["LlamaForCausalLM"])


@pytest.mark.parametrize("version, session", [("0.5.1", False), ("0.5.20", False), ("0.5.21", True), ("0.5.23", True)])
def test_weight_update_session_from_0_5_21(version, session):
    api = _api(version)
    begin, end = api.begin_update_calls(), api.end_update_calls()
    if session:
        assert [(c.method, c.path) for c in begin] == [("POST", "/begin_weight_update")]
        assert [(c.method, c.path) for c in end] == [("POST", "/end_weight_update")]
    else:
        assert begin == [] and end == []


def test_pause_modes_from_0_5_6():
    assert _api("0.5.6").pause_call("in_place").payload == {"mode": "in_place"}
    assert _api("0.5.5").pause_call(None).payload == {}
    with pytest.raises(UnsupportedServerError, match="no pause modes"):
        _api("0.5.5").pause_call("retract")


def test_update_calls_carry_sglang_field_names():
    api = _api("0.5.23")
    dist = api.update_distributed_call(names=["a"], dtypes=["float32"], shapes=[(2, 3)], group_name="g",
                                       weight_version="4", flush_cache=False)
    assert dist.payload == {"names": ["a"], "dtypes": ["float32"], "shapes": [[2, 3]], "group_name": "g",
                            "flush_cache": False, "weight_version": "4"}
    disk = api.update_disk_call("/w", weight_version=None, load_format=None)
    assert (disk.path, disk.payload) == ("/update_weights_from_disk", {"model_path": "/w"})
    init = api.init_group_call(master_address="h", master_port=1, rank_offset=3, world_size=5, group_name="g",
                               backend="gloo")
    assert init.payload == {"master_address": "h", "master_port": 1, "rank_offset": 3, "world_size": 5,
                            "group_name": "g", "backend": "gloo"}
    assert api.abort_call(None).payload == {"abort_all": True} and api.abort_call("x").payload == {"rid": "x"}
    with pytest.raises(RuntimeError, match=f"{URL}/update_weights_from_disk failed: no"):
        api.check_answer({"success": False, "message": "no"}, URL, "/update_weights_from_disk")


def test_lcr_serve_is_known_by_its_engine_field():
    assert _api("0.5.23", engine=LCR_SERVE_ENGINE).has_checksums
    assert not _api("0.5.23").has_checksums


def test_parse_generate_response_checks_ids_and_request():
    spec = _spec()
    body = {"text": "", "output_ids": [9, 2], "meta_info": {
        "id": "r-0", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 3,
        "weight_version": "v3", "output_token_logprobs": [[-0.5, 9, None], [-1.25, 2, None]]}}
    c = parse_generate_response(body, spec, "r-0", "http://s")
    assert (c.output_ids, c.output_logprobs, c.finish_reason, c.weight_version, c.prompt_tokens) == (
        [9, 2], [-0.5, -1.25], "stop", "v3", 3)
    body["meta_info"]["output_token_logprobs"][1][1] = 3
    with pytest.raises(ValueError, match="differ from output_ids"):
        parse_generate_response(body, spec, "r-0", "http://s")
    with pytest.raises(ValueError, match="belongs to request"):
        parse_generate_response(body, spec, "r-0.retry1", "http://s")


def test_parse_score_response_requires_every_token():
    body = {"meta_info": {"id": "s", "input_token_logprobs": [[None, 5, None], [-2.0, 6, None]]}}
    assert parse_score_response(body, [5, 6], "s", "u").input_logprobs == [None, -2.0]
    with pytest.raises(ValueError, match="scored 3 tokens"):
        parse_score_response(body, [5, 6, 7], "s", "u")
    with pytest.raises(ValueError, match="id 6 at position 1 differs from the sequence's 7"):
        parse_score_response(body, [5, 7], "s", "u")


def test_parse_score_response_accepts_sglangs_zero_for_the_last_vocabulary_id():
    # SGLang 0.5.23 reports ids >= vocab_size - 1 as 0 in input_token_logprobs (seen in CI: a sampled
    # token 999 of a 1000-token vocabulary scored back as id 0); the log-prob is still that token's.
    body = {"meta_info": {"id": "s", "input_token_logprobs": [[None, 5, None], [-2.5, 0, None]]}}
    assert parse_score_response(body, [5, 999], "s", "u").input_logprobs == [None, -2.5]


def _getter(answers: dict):
    async def get(path: str):
        if path not in answers:
            raise NotFound(path)
        return answers[path]
    return get


def test_detection_prefers_server_info_and_falls_back_to_get_server_info():
    new = asyncio.run(detect_server_api(_getter({"/server_info": {"version": "0.5.23"}}), URL))
    old = asyncio.run(detect_server_api(_getter({"/get_server_info": {"version": "0.5.4"}}), URL))
    assert (new.engine, new.version, old.version) == ("sglang", "0.5.23", "0.5.4")
    assert old.model_info_call().path == "/get_model_info"


def test_vllm_dev_mode_server_info_is_not_taken_for_sglang():
    # vLLM with VLLM_SERVER_DEV_MODE=1 answers /server_info with its own config (no version): ask /version.
    answers = {"/server_info": {"vllm_config": {}, "vllm_env": {}, "system_env": {}}, "/version": {"version": "0.32.0"}}
    api = asyncio.run(detect_server_api(_getter(answers), URL))
    assert (api.engine, api.version) == ("vllm", "0.32.0")


def test_detection_of_an_unknown_server_is_one_line():
    with pytest.raises(UnsupportedServerError, match="answers neither /server_info.*nor /version"):
        asyncio.run(detect_server_api(_getter({}), URL))

