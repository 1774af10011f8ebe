"""Schemas, tools and prompts shared by the structured-output tests of every strategy (native
and vLLM): one answer shape, one tool, one keyword reward."""

SMALL = {"type": "object",
         "properties": {"color": {"enum": ["red", "green", "blue"]},
                        "size": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["color", "size"], "additionalProperties": False}
SMALL_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SMALL,
                                                        "strict": True}}
ASK = [{"role": "user", "content": "Describe a ball as JSON with its color and size."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
KEYWORDS = {"name": "keywords", "weight": 1.0, "keywords": ["blue"]}
