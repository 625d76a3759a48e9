"""The demo page (`HEALTHAGENT_HTTP_DEMO`) in headless Chromium: gRPC-Web from a real browser,
streamed as it arrives, with tool calls, errors and the conversation history."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from healthagent.v1 import health_agent_pb2 as pb
from healthagent_service.emulator.chatkit_emulator import ChatKitEmulator
from tests.support.browser import chromium, chromium_version
from tests.support.service import ServiceFactory, emulator_env

if TYPE_CHECKING:
    from playwright.async_api import Page

API_KEY = "browser-test-api-key"
API_KEYS = [{"principal": "browser", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]
PACE_MS = 250
CHUNKS = 6


async def demo_url(emulator: ChatKitEmulator, start_service: ServiceFactory, **env: Any) -> str:
    service = await start_service(
        **emulator_env(
            emulator, HEALTHAGENT_HTTP_LISTEN="127.0.0.1:0", HEALTHAGENT_HTTP_DEMO="true", **env
        )
    )
    assert service.running.web is not None
    return f"http://127.0.0.1:{service.running.web.port}/"


@asynccontextmanager
async def demo_page(url: str) -> AsyncIterator[Page]:
    """The page, loaded; on the way out, no console error and no uncaught exception (a CSP
    violation is a console error)."""
    problems: list[str] = []
    async with chromium() as browser:
        context = await browser.new_context(accept_downloads=True)
        page = await context.new_page()
        page.set_default_timeout(20_000)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        await page.goto(url)
        await page.wait_for_selector("html[data-ready=true]", state="attached")
        yield page
        await context.close()
    assert problems == []


async def sign_in(page: Page, token: str = "", user: str = "demo-user") -> None:
    await page.fill("#token", token)
    await page.fill("#user", user)
    await page.click("#sign-in-button")


async def send(page: Page, message: str) -> None:
    await page.fill("#message", message)
    await page.click("#send")


async def wait_done(page: Page) -> None:
    await page.wait_for_selector("#chat-status[data-state=done]", state="attached")


async def last_answer(page: Page) -> str:
    return await page.locator("#transcript li[data-role=assistant]").last.inner_text()


def test_the_style_hash_in_the_pages_csp_is_the_styles() -> None:
    page = resources.files("healthagent_service.web").joinpath("demo", "index.html").read_text()
    style = re.search(r"<style>(.*?)</style>", page, re.DOTALL)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None and f"style-src 'sha256-{digest}'" in csp.group(1)
    assert "script-src 'self';" in csp.group(1) and "<script>" not in page
    assert not re.search(r"\son[a-z]+=", page), "no inline event handlers"


async def test_playwright_drives_debians_chromium() -> None:
    """Playwright expects a slightly newer Chromium than Debian's: the pinned pair must work."""
    version = chromium_version()
    async with chromium() as browser:
        assert browser.version and browser.version in version, (browser.version, version)
        page = await browser.new_page()
        await page.set_content("<p id=p>static</p>")
        await page.evaluate("document.getElementById('p').textContent = 'scripted'")
        assert await page.inner_text("#p") == "scripted"


@pytest.mark.slow
async def test_the_demo_page_chats_answers_a_tool_call_and_keeps_history(
    emulator: ChatKitEmulator, start_service: ServiceFactory, tmp_path: Path
) -> None:
    url = await demo_url(emulator, start_service, HEALTHAGENT_API_KEYS=API_KEYS)
    async with demo_page(url) as page:
        # no token: the service refuses, and the page shows the status and its ErrorInfo
        await sign_in(page)
        await page.wait_for_selector("#error[data-code=UNAUTHENTICATED]")
        assert await page.get_attribute("#error", "data-reason") == "UNAUTHENTICATED"
        assert await page.is_hidden("#app")

        await sign_in(page, token=API_KEY)
        await page.wait_for_selector("#app", state="visible")
        assert "Signed in as demo-user" in await page.inner_text("#signed-in")
        assert await page.is_visible("#conversations-empty") and await page.is_hidden("#error")

        # a paced reply: chunks show while the stream is open
        await send(page, f"[pace={PACE_MS}][chunks={CHUNKS}] hello from the browser")
        partial = await page.wait_for_function(
            """() => {
              const status = document.getElementById("chat-status");
              const answers = document.querySelectorAll("#transcript li[data-role=assistant]");
              const text = answers.length ? answers[answers.length - 1].textContent : "";
              return status.dataset.state === "streaming" && text ? text : null;
            }"""
        )
        seen_while_streaming = await partial.json_value()
        await wait_done(page)
        final = await last_answer(page)
        chunk_times = [
            float(t)
            for t in (await page.get_attribute("#chat-status", "data-chunk-times") or "").split(",")
        ]
        end_time = float(await page.get_attribute("#chat-status", "data-end-time") or "0")
        assert len(chunk_times) == CHUNKS
        assert final.startswith(seen_while_streaming) and len(seen_while_streaming) < len(final)
        # the first chunk was on the page long before the stream ended, the others in between
        spread = (CHUNKS - 1) * PACE_MS
        assert end_time - chunk_times[0] >= 0.6 * spread, (chunk_times, end_time)
        assert chunk_times[-1] - chunk_times[0] >= 0.6 * spread, chunk_times
        conversation_id = await page.inner_text("#conversation-id")
        assert conversation_id and conversation_id != "new"
        entry = page.locator(f'#conversations li[data-conversation-id="{conversation_id}"]')
        await entry.wait_for()

        # a client tool call, answered from the page: first refused, then with sample data
        await send(page, "[tool] how active was I this week?")
        await page.wait_for_selector("#tool-call", state="visible")
        await wait_done(page)
        assert await page.inner_text("#tool-call-name") == "get_health_data"
        arguments = json.loads(await page.inner_text("#tool-call-arguments"))
        assert arguments == {"metric": "steps", "days": 7}
        assert await page.get_attribute("#chat-status", "data-awaiting-tool-output") == "true"
        await page.fill("#tool-output", "{not json")
        await page.click("#send-tool-output")
        await page.wait_for_selector("#error[data-code=INVALID_ARGUMENT]")
        violation = page.locator('#error-violations li[data-field="tool_output.output_json"]')
        assert await violation.inner_text() == "tool_output.output_json: must be valid JSON"
        await page.wait_for_selector("#tool-call", state="visible")  # still to be answered
        assert await page.locator("#transcript li[data-role=tool][data-status=failed]").count() == 1
        await page.click("#fill-sample")
        sample = json.loads(await page.input_value("#tool-output"))
        assert sample["metric"] == "steps" and len(sample["values"]) == 7
        await page.click("#send-tool-output")
        await wait_done(page)
        assert await page.is_hidden("#error") and await page.is_hidden("#tool-call")
        answer = await last_answer(page)
        assert answer.startswith("Thanks. The tool returned ")
        assert json.loads(answer.removeprefix("Thanks. The tool returned ")[:-1]) == sample
        assert await page.inner_text("#conversation-id") == conversation_id

        # the history: open, export (shown and downloaded), delete
        await entry.locator("button[data-action=open]").click()
        await page.wait_for_selector("#conversation-view", state="visible")
        messages = page.locator("#conversation-messages li")
        roles = [await m.get_attribute("data-role") for m in await messages.all()]
        assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant"]
        assert await messages.first.inner_text() == (
            f"[pace={PACE_MS}][chunks={CHUNKS}] hello from the browser"
        )
        assert "get_health_data" in await messages.nth(3).inner_text()

        await entry.locator("button[data-action=export]").click()
        await page.wait_for_selector("#export-view", state="visible")
        exported = await page.inner_text("#export-content")
        # the export escapes Markdown punctuation in ids (docs/reliability.md, item 8)
        assert exported.startswith("# ") and conversation_id.replace("_", "\\_") in exported
        assert "hello from the browser" in exported and "Thanks. The tool returned" in exported
        filename = await page.inner_text("#export-filename")
        assert filename.endswith(".md")
        async with page.expect_download() as download_info:
            await page.click("#export-download")
        download = await download_info.value
        assert download.suggested_filename == filename
        saved = tmp_path / filename
        await download.save_as(saved)
        assert saved.read_text() == await page.text_content("#export-content")

        await entry.locator("button[data-action=delete]").click()
        await entry.wait_for(state="detached")
        await page.wait_for_selector("#conversations-empty", state="visible")
        assert await page.is_hidden("#conversation-view") and await page.is_hidden("#export-view")
        assert await page.inner_text("#conversation-id") == "new"


@pytest.mark.slow
async def test_the_demo_page_needs_no_token_on_an_open_service_and_can_stop_a_reply(
    emulator: ChatKitEmulator, start_service: ServiceFactory
) -> None:
    url = await demo_url(emulator, start_service)
    async with demo_page(url) as page:
        # a user id the service refuses: the BadRequest field violation is shown
        await sign_in(page, user="  ")
        await page.wait_for_selector("#error[data-code=INVALID_ARGUMENT]")
        violation = await page.inner_text('#error-violations li[data-field="user"]')
        assert violation.startswith("user: must be printable text")
        await sign_in(page)
        await page.wait_for_selector("#app", state="visible")
        assert "without a token" in await page.inner_text("#signed-in")

        await send(page, "[pace=400][chunks=50] a long answer")
        # at least two chunks shown: one progress event may bring several, so no exact count
        await page.wait_for_function(
            "() => Number(document.getElementById('chat-status').dataset.chunks) >= 2"
        )
        await page.click("#stop")
        await page.wait_for_selector("#chat-status[data-state=error]", state="attached")
        assert await page.inner_text("#chat-status") == "Stopped"
        assert await page.is_hidden("#error") and await page.is_enabled("#send")
        stopped = int(await page.get_attribute("#chat-status", "data-chunks") or "0")
        assert 2 <= stopped < 50

        await send(page, "short one")
        await wait_done(page)
        assert (await last_answer(page)).startswith("You said: short one.")


def test_the_page_encodes_what_the_proto_says() -> None:
    """The field numbers demo.js writes and reads are the proto's."""
    script = resources.files("healthagent_service.web").joinpath("demo", "demo.js").read_text()

    def schema(name: str) -> str:
        found = re.search(rf"const {name} = (\{{[^\n]*\}}|\{{.*?\n  \}});", script, re.DOTALL)
        assert found is not None, name
        return found.group(1)

    for message in (
        pb.ChatRequest,
        pb.ToolCall,
        pb.ConversationMessage,
        pb.Conversation,
        pb.ListConversationsRequest,
        pb.ListConversationsResponse,
        pb.ExportConversationRequest,
        pb.ExportConversationResponse,
    ):
        text = schema(message.DESCRIPTOR.name)
        for field in message.DESCRIPTOR.fields:
            assert f'{field.number}: ["{field.name}"' in text, (message.DESCRIPTOR.name, field.name)
    chat = schema("ChatResponse")
    for field in pb.ChatResponse.DESCRIPTOR.fields:
        assert f'{field.number}: ["{field.name}"' in chat, field.name
