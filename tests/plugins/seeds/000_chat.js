// Seed 000's JavaScript example, verbatim but for line breaks; the test swaps in the server URL.
const API_URL = 'http://aisocket.zeromi.cn:5000/api/chat';
const EMAIL = 'test@example.com';

async function chat(message) {
  try {
    // 发送消息
    const response = await fetch(API_URL, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ email: EMAIL, inp: message })
    });
    if (!response.ok) {
      throw new Error(`HTTP error! status: ${response.status}`);
    }
    // 获取完整对话记录
    const record = await fetch('http://aisocket.zeromi.cn:5000/api/record', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ email: EMAIL })
    }).then(res => res.json());
    console.log('最新回复:', record.text.slice(-1)[0]);
  } catch (error) {
    console.error('请求失败:', error);
  }
}

// 使用示例
chat("你好!").then(() => console.log("对话完成"));
