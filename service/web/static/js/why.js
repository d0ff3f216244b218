// "why?" under a search result: the match explanation, a heatmap PNG over the result with
// the classes both images share in a header.

import { ApiFailure, send } from "./api.js";
import { el } from "./dom.js";

// source is {file} for a photo search or {id} for a search by a stored image.
async function explainMatch(resultId, source) {
  let response;
  if (source.file) {
    const data = new FormData();
    data.append("file", source.file, source.file.name || "pasted.png");
    data.append("result_id", resultId);
    response = await send("/explain", { method: "POST", body: data });
  } else {
    const query = `query_id=${encodeURIComponent(source.id)}` +
      `&result_id=${encodeURIComponent(resultId)}`;
    response = await send(`/explain?${query}`);
  }
  if (!response.ok) throw new ApiFailure("explain_failed", "", response.status);
  let classes = [];
  try {
    classes = JSON.parse(response.headers.get("X-Match-Classes") || "[]");
  } catch (_) {
    classes = [];
  }
  return { url: URL.createObjectURL(await response.blob()), classes };
}

export function whyButton(item, name, source) {
  const button = el("button", { type: "button", class: "why", text: "why?" });
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const { url, classes } = await explainMatch(item.id, source);
      const shared = classes.slice(0, 3)
        .map(([label, score]) => `${label} ${Math.round(score * 100)}%`).join(", ");
      button.replaceWith(el("figure", { class: "why-figure" },
        el("img", { src: url, alt: `Where ${name} matches the query (bright = similar)` }),
        el("figcaption", { class: "meta muted",
                           text: shared ? `Both look like: ${shared}` : "No shared class" })));
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      button.disabled = false;
      button.textContent = "why? (failed, retry)";
    }
  });
  return button;
}
