from glm5.tokenizer.tool_schema import ToolSchemas, ValueKind, convert_value

PARAMS = {
    "type": "object",
    "properties": {
        "s": {"type": "string"},
        "s_enum": {"enum": ["a", "b"]},
        "s_const": {"const": "x"},
        "i": {"type": "integer"},
        "n": {"type": "number"},
        "mixed_enum": {"enum": ["a", 1]},
        "opt": {"type": ["string", "null"]},
        "one": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
        "any_open": {"anyOf": [{"type": "string"}, {}]},
        "all": {"allOf": [{"type": ["string", "integer"]}, {"type": "integer"}]},
        "ref": {"$ref": "#/definitions/Name"},
        "bad_ref": {"$ref": "http://example.com/schema"},
        "free": {},
    },
    "definitions": {"Name": {"type": "string"}},
}


def test_kinds():
    for wrapped in (True, False):
        fn = {"name": "f", "parameters": PARAMS}
        schemas = ToolSchemas([{"type": "function", "function": fn} if wrapped else fn])
        kinds = {k: schemas.kind_of("f", k) for k in PARAMS["properties"]}
        assert kinds == {
            "s": ValueKind.STRING,
            "s_enum": ValueKind.STRING,
            "s_const": ValueKind.STRING,
            "i": ValueKind.TYPED,
            "n": ValueKind.TYPED,
            "mixed_enum": ValueKind.UNION,
            "opt": ValueKind.UNION,
            "one": ValueKind.TYPED,
            "any_open": ValueKind.INFER,
            "all": ValueKind.TYPED,
            "ref": ValueKind.STRING,
            "bad_ref": ValueKind.INFER,
            "free": ValueKind.INFER,
        }
        assert schemas.kind_of("f", "missing") is ValueKind.INFER
        assert schemas.kind_of("g", "s") is ValueKind.INFER
        assert "f" in schemas and schemas.names == ["f"]


def test_convert_value():
    assert convert_value(" 42 ", ValueKind.STRING) == " 42 "
    assert convert_value("42", ValueKind.TYPED) == 42
    assert convert_value("4.5e1", ValueKind.TYPED) == 45.0
    assert convert_value("None", ValueKind.INFER) is None
    assert convert_value("(1, 2)", ValueKind.INFER) == [1, 2]
    assert convert_value("{1, 2}", ValueKind.INFER) == "{1, 2}"  # a set is not JSON
    assert convert_value("Infinity", ValueKind.TYPED) == "Infinity"
    numeric = frozenset({"string", "number"})
    assert convert_value("3", ValueKind.UNION, numeric) == 3  # integer is a number
    assert convert_value('"quoted"', ValueKind.UNION, numeric) == '"quoted"'
    assert convert_value("x" * 20000, ValueKind.TYPED) == "x" * 20000


def test_recovery_prefix_and_garbage_tools():
    schemas = ToolSchemas([{"function": {"name": "send"}}, {"name": "send_command"}, "junk", {"function": {"name": 3}}])
    assert schemas.names == ["send", "send_command"]
    assert schemas.longest_name_prefix("send_commandcommand") == "send_command"
    assert schemas.longest_name_prefix("sendx") == "send"
    assert schemas.longest_name_prefix("send") is None
    assert ToolSchemas(None).declared is False
