"""Tool definitions shared by the output-parser tests."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "lat": {"type": "number"},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "opts": {"type": "object"},
                "note": {"type": ["string", "null"]},
                "alt": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "ref": {"$ref": "#/$defs/Count"},
                "code": {"type": ["string", "integer"]},
            },
            "$defs": {"Count": {"type": "integer"}},
        },
    },
}
GET_TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SEND = {
    "type": "function",
    "function": {"name": "send_command", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}},
}
TOOLS = [WEATHER, GET_TIME, SEND]
