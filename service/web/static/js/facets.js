// The search page's filters: facets counted by the API become checkboxes and ranges, and
// what is ticked becomes the search's filter JSON (which stays editable by hand).

import { ApiFailure, api } from "./api.js";
import { $, el, formatValue } from "./dom.js";
import { plainWords } from "./messages.js";

// Filter keys that name real columns must be spelled "metadata.<key>" (docs/search.md).
const COLUMNS = new Set(["collection", "status", "created_at", "id"]);

function filterKey(key) {
  return COLUMNS.has(key) ? `metadata.${key}` : key;
}

function valuesCondition(group) {
  const chosen = Array.from(group.querySelectorAll("input:checked"))
    .map((box) => JSON.parse(box.dataset.value));
  if (chosen.length === 1) return chosen[0];
  if (chosen.length > 1) return { $in: chosen };
  return undefined;
}

function rangeCondition(group) {
  const isDate = group.dataset.type === "date";
  const read = (input) => {
    if (!input.value) return null;
    return isDate ? input.value : Number(input.value);
  };
  const lo = read(group.querySelector("[data-bound=min]"));
  const hi = read(group.querySelector("[data-bound=max]"));
  const condition = {};
  if (lo !== null) condition.$gte = lo;
  if (hi !== null) condition.$lte = hi;
  return Object.keys(condition).length ? condition : undefined;
}

// The filter that the ticked values and the entered bounds mean.
function filterOf(facetList) {
  const filter = {};
  for (const group of facetList.querySelectorAll("[data-facet]")) {
    const condition = group.dataset.kind === "values"
      ? valuesCondition(group) : rangeCondition(group);
    if (condition !== undefined) filter[filterKey(group.dataset.facet)] = condition;
  }
  return filter;
}

function valueChecks(group, facet, index) {
  facet.values.forEach((v, j) => {
    const id = `facet-${index}-${j}`;
    const box = el("input", { type: "checkbox", id, "data-value": JSON.stringify(v.value) });
    group.append(el("div", { class: "check" }, box,
      el("label", { for: id }, formatValue(v.value),
        el("span", { class: "count", text: ` ${v.count}` }))));
  });
}

function rangeBounds(group, facet, index) {
  const type = facet.type === "date" ? "date" : "number";
  const bound = (which, value) => {
    const id = `facet-${index}-${which}`;
    const shown = type === "date" ? String(value).slice(0, 10) : value;
    const input = el("input", {
      id, type, "data-bound": which, placeholder: String(shown), step: type === "number" ? "any" : null,
    });
    return el("div", { class: "field" },
      el("label", { for: id, text: which === "min" ? "From" : "To" }), input);
  };
  group.append(el("div", { class: "range" }, bound("min", facet.min), bound("max", facet.max)));
  group.append(el("p", { class: "muted small",
    text: `${formatValue(facet.min)} to ${formatValue(facet.max)}` }));
}

function facetGroup(facet, index) {
  const legend = el("legend", {},
    facet.key, el("span", { class: "muted", text: ` (${facet.count})` }));
  const group = el("fieldset", {
    class: "facet", "data-facet": facet.key, "data-kind": facet.kind, "data-type": facet.type,
  }, legend);
  if (facet.kind === "values") valueChecks(group, facet, index);
  else rangeBounds(group, facet, index);
  return group;
}

async function loadFacets(collection, facetList, facetStatus) {
  try {
    const query = collection ? `?collection=${encodeURIComponent(collection)}` : "";
    const body = await api("/facets" + query);
    const usable = body.facets.filter((f) => f.kind !== "none");
    facetList.replaceChildren(...usable.map(facetGroup));
    facetStatus.textContent = usable.length
      ? (body.sampled ? `Counted over the newest ${body.scanned} of ${body.total} images.` : "")
      : "These images have no metadata to filter on.";
    facetStatus.hidden = !facetStatus.textContent;
  } catch (error) {
    if (!(error instanceof ApiFailure)) throw error;
    facetStatus.textContent = "Filters could not be loaded: " + plainWords(error);
  }
}

// Loads the collection's facets into the page; onChange runs whenever the filter changes.
export function setupFacets({ collection, filterBox, onChange }) {
  const facetList = $("#facet-list");
  const facetStatus = $("#facets-status");

  function facetsToFilter() {
    const filter = filterOf(facetList);
    filterBox.value = Object.keys(filter).length ? JSON.stringify(filter) : "";
    onChange();
  }

  facetList.addEventListener("change", facetsToFilter);
  filterBox.addEventListener("change", onChange);
  $("#clear-filters").addEventListener("click", () => {
    facetList.querySelectorAll("input").forEach((input) => {
      if (input.type === "checkbox") input.checked = false;
      else input.value = "";
    });
    facetsToFilter();
  });
  loadFacets(collection, facetList, facetStatus);
}
