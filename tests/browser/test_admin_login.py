"""An operator logs in to the admin with the login form."""

from __future__ import annotations

import pytest

from tests.browser.conftest import expect, log_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_staff_user_logs_in_to_the_admin_and_a_wrong_password_is_refused(page, web, operator):
    page.goto(f"{web}/admin/")
    expect(page).to_have_url(f"{web}/admin/login/?next=/admin/")  # the admin is closed to strangers

    page.fill("#id_username", operator.username)
    page.fill("#id_password", "not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".errornote")).to_be_visible()
    expect(page).to_have_url(f"{web}/admin/login/?next=/admin/")

    log_in(page, web, operator)
    expect(page.locator("#user-tools")).to_contain_text(operator.username)
    expect(page.get_by_role("link", name="Jobs", exact=True).first).to_be_visible()
    expect(page.get_by_role("link", name="Routing policies")).to_be_visible()
