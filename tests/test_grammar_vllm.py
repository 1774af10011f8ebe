"""The vLLM side of a GrammarSpec, against the installed vLLM (the CPU build in the test lock):
`vllm_structured_outputs` builds vLLM's own StructuredOutputsParams, and vLLM's request-time
validation for its xgrammar backend accepts them. The schemas our check refuses for constraints
xgrammar would drop are ones vLLM would have let through: why the check runs first."""

from __future__ import annotations

import json

import pytest

from alignserve.engine.grammar import (
    GrammarError,
    GrammarSpec,
    ToolDef,
    canonical_json,
    check_schema,
    vllm_structured_outputs,
)

sampling_params = pytest.importorskip("vllm.sampling_params")
backend = pytest.importorskip("vllm.v1.structured_output.backend_xgrammar")

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = ToolDef("lookup", canonical_json({"type": "object", "properties": {
    "q": {"type": "string"}}, "required": ["q"]}))


def vllm_params(spec: GrammarSpec):
    so = sampling_params.StructuredOutputsParams(**vllm_structured_outputs(spec))
    return sampling_params.SamplingParams(structured_outputs=so)


@pytest.mark.parametrize("spec", [
    GrammarSpec(response="json_schema", schema=canonical_json(SCHEMA)),
    GrammarSpec(response="json_object"),
    GrammarSpec(tools=(TOOL,), tool_mode="auto"),
    GrammarSpec(tools=(TOOL,), tool_mode="required", parallel=False),
    GrammarSpec(response="json_schema", schema=canonical_json(SCHEMA), tools=(TOOL,),
                tool_mode="auto"),
])
def test_vllm_validates_our_specs(spec):
    params = vllm_params(spec)
    backend.validate_xgrammar_grammar(params)  # raises VLLMValidationError when it would 400
    so = params.structured_outputs
    if spec.kind == "tools":
        assert json.loads(so.structural_tag) == spec.structural_tag()


def test_what_vllm_lets_through_our_check_refuses():
    # vLLM's own check passes `not` and if/then/else; xgrammar then ignores them
    for schema in ({"not": {"type": "string"}},
                   {"type": "string", "if": {"minLength": 2}, "then": {"pattern": "^a"}}):
        backend.validate_xgrammar_grammar(vllm_params(
            GrammarSpec(response="json_schema", schema=canonical_json(schema))))
        with pytest.raises(GrammarError):
            check_schema(schema)
