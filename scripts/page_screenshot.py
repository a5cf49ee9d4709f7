"""Screenshot of the page of a running `--mode=serve` server (for the README's docs/page.png).

    python scripts/page_screenshot.py [--url http://127.0.0.1:8501] [--out docs/page.png]

Headless Chromium (Debian's chromium + chromium-driver) types "Firework" and "Teenage Dream",
picks each from the autocomplete list, adds the first recommendation, and saves the page.
"""

from __future__ import annotations

import argparse

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8501")
    parser.add_argument("--out", default="docs/page.png")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--window-size=900,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(args.url + "/")
        for typed in ("Firework", "Teenage Dream"):
            before = len(driver.find_elements(By.CSS_SELECTOR, "#playlist li"))
            driver.find_element(By.ID, "song").send_keys(typed)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#suggestions li"))
            driver.find_element(By.CSS_SELECTOR, "#suggestions li").click()
            wait.until(
                lambda d, n=before: len(d.find_elements(By.CSS_SELECTOR, "#playlist li")) > n
            )
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recommendations .add"))
        driver.find_element(By.CSS_SELECTOR, "#recommendations .add").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#playlist li")) == 3)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recommendations .add"))
        driver.find_element(By.ID, "song").send_keys("dyna")  # the autocomplete list open
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#suggestions li"))
        driver.save_screenshot(args.out)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
