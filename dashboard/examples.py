"""Ready-to-paste examples of calling the API with a new key, for the API keys page: curl for
``POST /v1/glm/infer``, Python with the official ``openai`` SDK, JavaScript for ``WS /ws/v1/infer``.
tests/test_keys_page.py runs each of them, as shown, against a live stack."""

import base64
import io
import json
from functools import cache

PROMPT = "What is in this picture?"


@cache
def sample_image_data_url() -> str:
    """A small PNG (a 32×32 gradient) as a data URL, for the JavaScript example to run as pasted."""
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    image.putdata([(x * 8, y * 8, 128) for y in range(32) for x in range(32)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def examples(*, base_url: str, key: str, model: str) -> list[dict]:
    """``base_url``: this server's root as clients reach it (``http(s)://host[:port]``, no slash)."""
    ws_url = "ws" + base_url.removeprefix("http") + "/ws/v1/infer"
    curl = (
        f'curl -s -H "Authorization: Bearer {key}" -F image=@picture.png \\\n'
        f'     -F prompt="{PROMPT}" -F max_tokens=64 {base_url}/v1/glm/infer'
    )
    python = f'''import base64

from openai import OpenAI

client = OpenAI(base_url="{base_url}/v1", api_key="{key}")
with open("picture.png", "rb") as f:
    image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
response = client.chat.completions.create(
    model={json.dumps(model)},
    messages=[
        {{
            "role": "user",
            "content": [
                {{"type": "text", "text": "{PROMPT}"}},
                {{"type": "image_url", "image_url": {{"url": image}}}},
            ],
        }}
    ],
    max_tokens=64,
)
print(response.choices[0].message.content)'''
    javascript = f"""// Node 22+ (Node 20: node --experimental-websocket example.js); the answer arrives token by token.
const image = "{sample_image_data_url()}"; // your picture as a data URL
const socket = new WebSocket("{ws_url}");
let answer = "";
socket.onopen = () => socket.send(JSON.stringify({{ type: "auth", api_key: "{key}" }}));
socket.onmessage = (event) => {{
  const frame = JSON.parse(event.data);
  if (frame.type === "ready") {{
    socket.send(JSON.stringify({{ type: "infer", prompt: "{PROMPT}", image, max_tokens: 64 }}));
  }} else if (frame.type === "token") {{
    answer += frame.text;
  }} else if (frame.type === "done") {{
    console.log(answer, frame.usage);
    socket.close();
  }} else if (frame.type === "error") {{
    console.error(frame.code, frame.message);
    socket.close();
  }}
}};"""
    return [
        {
            "id": "curl",
            "title": "curl: POST /v1/glm/infer",
            "note": "Sends picture.png from the current folder with a prompt; the answer comes back as JSON.",
            "code": curl,
        },
        {
            "id": "python",
            "title": "Python: the openai SDK",
            "note": "pip install openai; reads picture.png and asks chat completions about it.",
            "code": python,
        },
        {
            "id": "javascript",
            "title": "JavaScript: the websocket",
            "note": "Authenticates with an auth frame, sends an infer frame, and gathers the token frames until done.",
            "code": javascript,
        },
    ]
