// Seed 001's JavaScript example, verbatim; the test swaps in the server URL and key.
const response = await fetch('http://localhost:9090/v1/chat/completions', {
method: 'POST',
headers: {
'Content-Type': 'application/json',
'X-API-Key': 'your-api-key-here',
'X-AI-Provider': 'deepseek'
},
body: JSON.stringify({
model: 'deepseek-chat',
messages: [
{
role: 'user',
content: '你好,请介绍一下青城数智平台'
}
],
temperature: 0.7
})
});
const result = await response.json();
console.log(result);
