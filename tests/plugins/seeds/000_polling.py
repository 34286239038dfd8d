# Seed 000's Python example, verbatim but for line breaks; the test swaps in the server URL.
import requests
from time import sleep

BASE_URL = "http://aisocket.zeromi.cn:5000"
EMAIL = "test@example.com"


def chat_with_ai(message):
    # 发送消息
    response = requests.post(
        f"{BASE_URL}/api/chat",
        json={"email": EMAIL, "inp": message}
    )
    if response.status_code != 200:
        raise Exception(f"请求失败: {response.text}")
    # 轮询获取回复
    while True:
        record = requests.post(
            f"{BASE_URL}/api/record",
            json={"email": EMAIL}
        ).json()
        last_msg = record["text"][-1]
        if last_msg["role"] == "ai":
            print(f"AI回复: {last_msg['content']}")
            if "think" in last_msg:
                print(f"思考过程: {last_msg['think']}")
            break
        sleep(0.5)  # 适当间隔轮询


# 使用示例
chat_with_ai("解释一下量子计算的基本原理")
