# Seed 001's Python example, verbatim; the test swaps in the server URL and key.
import requests
import json
url = "http://localhost:9090/v1/chat/completions"
headers = {
"Content-Type": "application/json",
"X-API-Key": "your-api-key-here",
"X-AI-Provider": "deepseek"
}
data = {
"model": "deepseek-chat",
"messages": [
{
"role": "user",
"content": "你好,请介绍一下青城数智平台"
}
],
"temperature": 0.7
}
response = requests.post(url, headers=headers, json=data)
result = response.json()
print(result)
