"""A real headless browser for the UI tests: Debian's chromium driven by Selenium.

Nothing is downloaded: the browser is ``/usr/bin/chromium`` and the driver
``/usr/bin/chromedriver`` (apt packages ``chromium`` and ``chromium-driver``,
installed by ``make venv``), and Selenium Manager is kept offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("SLURM_RAY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SLURM_RAY_CHROMEDRIVER", "/usr/bin/chromedriver")
# Flags that work headless as root, with no network beyond loopback.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def missing_browser() -> str | None:
    """Why no browser can start here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} missing: apt-get install chromium chromium-driver (make venv does)"
    return None


class Browser:
    """One Chromium session; every step can leave a numbered screenshot in ``out``."""

    def __init__(self, out: Path) -> None:
        os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self._profile = tempfile.mkdtemp(prefix="slurm-ray-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={self._profile}"):
            options.add_argument(flag)
        # The person's browser is another machine on a real site; here it shares
        # two cores with Airflow and the cluster, so it yields (a Grid page
        # left open re-renders at a core's worth).
        service = Service(CHROMEDRIVER, popen_kw={"preexec_fn": lambda: os.nice(10)})
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_page_load_timeout(60)
        self._step = 0

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def shot(self, name: str) -> Path:
        """Save a screenshot of the page as it is now: ``NN-name.png``."""
        self._step += 1
        path = self.out / f"{self._step:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 30) -> Any:
        """Poll ``cond`` until it returns something truthy; screenshot and fail otherwise."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = cond()
                if value:
                    return value
            except Exception as exc:  # stale elements while React re-renders
                last = exc
            time.sleep(0.3)
        path = self.shot(f"timeout-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"browser: {what} not seen in {timeout:.0f} s ({path}); last: {last}")

    def find(self, css: str, root: Any = None) -> Any:
        from selenium.webdriver.common.by import By

        return (root or self.driver).find_elements(By.CSS_SELECTOR, css)

    def xpath(self, expr: str, root: Any = None) -> Any:
        from selenium.webdriver.common.by import By

        return (root or self.driver).find_elements(By.XPATH, expr)


class AirflowUI(Browser):
    """The Airflow 3 UI as a person uses it: log in, open a trigger form, fill it, trigger."""

    def __init__(self, out: Path, base: str) -> None:
        super().__init__(out)
        self.base = base.rstrip("/")

    def login(self, user: str, password: str) -> None:
        self.driver.get(f"{self.base}/")
        name = self.wait("login form", lambda: self.find("input[name=username]"))[0]
        name.send_keys(user)
        self.find("input[name=password]")[0].send_keys(password)
        self.shot("login")
        self.find("button[type=submit]")[0].click()
        self.wait("logged in", lambda: "/auth/login" not in self.driver.current_url)

    def open_trigger_form(self, dag_id: str) -> Any:
        """The trigger dialog of ``dag_id`` with its Run Parameters rendered."""
        self.driver.get(f"{self.base}/dags/{dag_id}")
        self.wait("Trigger button", lambda: self.find('button[aria-label="Trigger Dag"]'))[
            0
        ].click()
        return self.wait(
            "trigger form",
            lambda: [
                d
                for d in self.find(".chakra-dialog__content")
                if "Run Parameters" in d.text and self.find("[id^=element_]", d)
            ],
        )[0]

    def trigger_button(self, dialog: Any) -> Any:
        return next(b for b in self.find("button", dialog) if b.text.strip() == "Trigger")

    def invalid_fields(self, dialog: Any) -> dict[str, str]:
        """``{param name: message}`` for every form row the UI marks invalid."""
        out = {}
        for row in self.find(".chakra-field__root[data-invalid]", dialog):
            label = self.find("label", row)
            name = label[0].text.replace("*", "").strip() if label else "?"
            errors = self.find(".chakra-field__errorText", row)
            out[name] = errors[0].text if errors else ""
        return out

    def field(self, name: str) -> Any:
        return self.find(f"input[name=element_{name}]")[0]

    def type_into(self, name: str, text: str) -> None:
        """Replace a text or number field's content, as typed on the keyboard."""
        from selenium.webdriver.common.keys import Keys

        element = self.field(name)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(text)

    def type_json(self, name: str, text: str) -> None:
        """Replace a JSON editor field's content (Monaco), as typed on the keyboard."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        lines = self.find(f"#element_{name} .view-lines")[0]
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", lines)
        lines.click()
        # The form re-renders the editor whenever its text parses: a leading 'x'
        # keeps every partial text invalid until the whole value is typed.
        chain = ActionChains(self.driver)
        chain.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys("x")
        chain.send_keys(text)
        chain.key_down(Keys.CONTROL).send_keys(Keys.HOME).key_up(Keys.CONTROL)
        chain.send_keys(Keys.DELETE).perform()

    def json_text(self, name: str) -> str:
        return str(self.find(f"#element_{name} .view-lines")[0].text)

    def alerts(self) -> list[Any]:
        """The error boxes on the page (the form shows the API's 400 answer in one)."""
        return [a for a in self.find(".chakra-alert__root") if a.get_attribute("textContent")]
