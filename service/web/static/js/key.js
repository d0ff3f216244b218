// The 401 page's form: the key entered is kept (see api.js) and the page loads again with it.

import { storeKey } from "./api.js";
import { $ } from "./dom.js";

export function keyForm() {
  const form = $("#key-form");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(new FormData(form).get("key").trim());
    location.reload();
  });
}
