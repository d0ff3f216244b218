// The image page: "More like this" by the image's id, its neighbours on the similarity
// graph, and its near-duplicates (the last two only where the graph API is registered).

import { ApiFailure, api, postJson } from "./api.js";
import { card, renderResults } from "./cards.js";
import { $, plural, readK } from "./dom.js";
import { clearMessage, plainWords, showMessage } from "./messages.js";

function moreLikeThis(id, collection) {
  const list = $("#results");
  const status = $("#results-status");
  $("#like-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessage();
    status.textContent = "Searching…";
    try {
      const body = await postJson("/search", {
        image_id: id, collection, k: readK($("#like-k"), 12), model: $("#like-model").value,
      });
      renderResults(list, body.results, { collection });
      status.textContent = body.results.length
        ? `${body.results.length} similar images in “${collection}”, best first.`
        : "No other images in this collection yet.";
      list.dataset.state = "done";
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      showMessage(plainWords(error));
      status.textContent = "The search did not run; see the message above.";
    }
  });
}

async function relatedImages(id, collection) {
  const list = $("#related");
  const status = $("#related-status");
  try {
    const body = await api(`/images/${encodeURIComponent(id)}/related?limit=12`);
    list.replaceChildren(...body.items.map((item) => card(item, { collection })));
    status.textContent = body.items.length
      ? "Reached over the nearest-neighbour graph, fewest hops first."
      : "No related images on the graph yet.";
  } catch (error) {
    if (!(error instanceof ApiFailure)) throw error;
    status.textContent = "Related images are not available: " + plainWords(error);
  }
  list.dataset.state = "done";
}

function duplicateFinder(id, collection) {
  const button = $("#find-duplicates");
  const list = $("#duplicates");
  const status = $("#duplicates-status");
  button.addEventListener("click", async () => {
    button.disabled = true;
    status.textContent = "Looking for near-duplicates…";
    try {
      const body = await api(`/duplicates?collection=${encodeURIComponent(collection)}`);
      const group = body.clusters.find((c) => c.ids.includes(id));
      const others = group ? group.ids.filter((other) => other !== id) : [];
      const items = await Promise.all(
        others.slice(0, 24).map((other) => api(`/images/${encodeURIComponent(other)}`)));
      list.replaceChildren(...items.map((item) => card(item, { collection })));
      status.textContent = others.length
        ? `${plural(others.length, "near-duplicate")} of this image.`
        : "No near-duplicates of this image in this collection.";
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      status.textContent = "Duplicates could not be found: " + plainWords(error);
    } finally {
      button.disabled = false;
      list.dataset.state = "done";
    }
  });
}

export function imagePage() {
  const root = $("#detail");
  const id = root.dataset.imageId;
  const collection = root.dataset.collection;
  if ($("#related")) relatedImages(id, collection);
  if ($("#find-duplicates")) duplicateFinder(id, collection);
  moreLikeThis(id, collection);
}
