// Image cards, shared by search results, browse pages and the image page's lists.

import { API } from "./api.js";
import { el, formatValue, plural } from "./dom.js";
import { whyButton } from "./why.js";

// A short name for an image: its label (or title, name), else its file name.
export function nameOf(item) {
  const meta = item.metadata || {};
  for (const key of ["label", "title", "name", "category"]) {
    if (typeof meta[key] === "string" && meta[key]) return meta[key];
  }
  return item.filename || "Image";
}

function metaLine(meta) {
  return Object.entries(meta || {})
    .filter(([, v]) => v === null || typeof v !== "object")
    .slice(0, 3)
    .map(([k, v]) => `${k}: ${formatValue(v)}`)
    .join(" · ");
}

// One card: a ranked result (rank, score, "why?"), a graph neighbour (hops) or a stored image.
export function card(item, { rank = null, collection = "", why = null } = {}) {
  const name = nameOf(item);
  const href = `/images/${encodeURIComponent(item.id)}` +
    (collection ? `?collection=${encodeURIComponent(collection)}` : "");
  const hops = item.hops !== undefined
    ? `${plural(item.hops, "hop")}, distance ${item.distance.toFixed(3)}` : "";
  let alt = `${name}, ${item.status || "stored"}`;
  if (rank !== null) alt = `Result ${rank}: ${name}, score ${item.score.toFixed(3)}`;
  else if (hops) alt = `${name}, ${hops}`;
  const img = el("img", {
    src: `${API}/images/${encodeURIComponent(item.id)}/thumbnail`, alt, loading: "lazy",
    width: 256, height: 256,
  });
  const body = el("div", { class: "card-body" });
  if (rank !== null) {
    body.append(el("p", { class: "score" },
      el("span", { class: "rank", text: `#${rank}` }), ` score ${item.score.toFixed(3)}`));
  } else if (hops) {
    body.append(el("p", { class: "score", text: hops }));
  } else if (item.status) {
    body.append(el("p", {}, el("span", { class: `badge badge-${item.status}`, text: item.status })));
  }
  body.append(el("p", { class: "name", text: name }));
  const line = metaLine(item.metadata);
  if (line) body.append(el("p", { class: "meta muted", text: line }));
  if (item.collection && !collection) {
    body.append(el("p", { class: "meta muted", text: `in ${item.collection}` }));
  }
  return el("li", { class: "card", "data-id": item.id },
    el("a", { href, class: "card-link" }, img, body),
    rank !== null && why ? whyButton(item, name, why) : null);
}

// Ranked results into a list, replacing what it showed unless more are appended.
export function renderResults(list, hits,
                              { append = false, collection = "", offset = 0, why = null } = {}) {
  if (!append) list.replaceChildren();
  hits.forEach((hit, i) => list.append(card(hit, { rank: offset + i + 1, collection, why })));
}
