"""The example's tasks: found by Conveyor because they live in an app's tasks.py."""

import asyncio
import hashlib

from django.tasks import TaskContext, task


@task(queue_name="emails", priority=10)
def send_welcome_email(user_id: int) -> str:
    """Pretend to send an email (the I/O is a short sleep)."""
    return f"welcome email sent to user {user_id}"


@task()
def make_thumbnail(image_id: int, size: int = 128) -> dict:
    """A little CPU work: hash some bytes as a stand-in for resizing an image."""
    digest = hashlib.sha256(f"{image_id}:{size}".encode() * 200).hexdigest()
    return {"image": image_id, "size": size, "digest": digest[:12]}


@task()
async def fetch_exchange_rate(currency: str) -> float:
    """An async task: Conveyor runs it on an event loop."""
    await asyncio.sleep(0.001)
    return {"EUR": 1.0, "USD": 1.08, "GBP": 0.86}.get(currency, 1.0)


@task(takes_context=True)
def charge_order(context: TaskContext, order_id: int) -> str:
    """Fails for every 50th order, to show failures in the summary."""
    if order_id % 50 == 0:
        raise RuntimeError(f"card declined for order {order_id}")
    return f"order {order_id} charged (attempt {context.attempt})"
