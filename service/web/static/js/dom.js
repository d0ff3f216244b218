// Building the page: elements get their text through text nodes and attributes, never
// through HTML strings, so nothing the API returns can become markup.

export const $ = (selector, root = document) => root.querySelector(selector);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

// "1 result", "2 results".
export function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

// k from a number field, within what the API accepts.
export function readK(input, fallback) {
  return Math.max(1, Math.min(1000, parseInt(input.value, 10) || fallback));
}
